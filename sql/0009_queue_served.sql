-- pgsched schema, version 9: whether a live worker serves a queue (issue 20).
--
-- A client warns once when it enqueues to a queue no live worker serves: the
-- job would wait, counted only as `unroutable` in queue_stats. Enqueuers may
-- not read pgsched.workers (hosts, pids), so they ask this function, which
-- answers yes or no and nothing else.

GRANT SELECT (queues, lease_expires_at) ON pgsched.workers TO pgsched_owner;

CREATE FUNCTION pgsched.queue_served(q text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgsched, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM pgsched.workers w WHERE w.lease_expires_at > pgsched.now() AND q = ANY (w.queues))
$$;
COMMENT ON FUNCTION pgsched.queue_served(text) IS 'Whether a live worker claims from queue q';
ALTER FUNCTION pgsched.queue_served(text) OWNER TO pgsched_owner;
REVOKE EXECUTE ON FUNCTION pgsched.queue_served(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgsched.queue_served(text) TO pgsched_enqueuer, pgsched_reader, pgsched_worker, pgsched_admin;

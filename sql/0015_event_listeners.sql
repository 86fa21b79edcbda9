-- pgsched schema, version 15: job events are sent only while an API process listens.
--
-- A transaction that sent a NOTIFY takes a cluster-wide lock at commit and holds it through its
-- commit record's flush (PostgreSQL keeps the notification queue in commit order), so such commits
-- queue behind each other and group commit no longer batches them. Migration 12 made every claim
-- and every completion send one: the raw-SQL drain of 10 clients claiming one job each (bench W3)
-- fell from 1,183 to 678 jobs/s, one commit per fsync. Each API process now keeps a row here for
-- as long as it listens (renewed every 30 s, gone 90 s after its last renewal), and the job trigger
-- sends nothing while the table holds no live row: a deployment without the API pays one read of
-- a table of a few rows per statement.
CREATE TABLE pgsched.event_listeners (
    id uuid PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
COMMENT ON TABLE pgsched.event_listeners IS
    'Processes listening on pgsched_events (one row per API process, renewed while it listens); job events are sent only while a row is live';

-- Read by the trigger, which runs as whoever changed the jobs (pgsched_owner inside enqueue).
GRANT SELECT ON pgsched.event_listeners
    TO pgsched_enqueuer, pgsched_reader, pgsched_worker, pgsched_admin, pgsched_owner, pgsched_api;
GRANT INSERT, UPDATE, DELETE ON pgsched.event_listeners TO pgsched_api, pgsched_admin;

CREATE OR REPLACE FUNCTION pgsched.send_job_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    groups refcursor;
    g record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgsched.event_listeners l WHERE l.expires_at > pg_catalog.now())
       OR pg_catalog.pg_notification_queue_usage() > 0.5 THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        OPEN groups FOR
            SELECT n.state, n.queue, n.owner, n.workflow_id, pg_catalog.array_agg(n.id) AS ids
            FROM new_rows n
            GROUP BY n.state, n.queue, n.owner, n.workflow_id;
    ELSE
        OPEN groups FOR
            SELECT n.state, n.queue, n.owner, n.workflow_id, pg_catalog.array_agg(n.id) AS ids
            FROM new_rows n JOIN old_rows o ON o.id = n.id
            WHERE n.state <> o.state
            GROUP BY n.state, n.queue, n.owner, n.workflow_id;
    END IF;
    LOOP
        FETCH groups INTO g;
        EXIT WHEN NOT FOUND;
        FOR chunk IN 0 .. (pg_catalog.cardinality(g.ids) - 1) / 300 LOOP
            PERFORM pg_catalog.pg_notify('pgsched_events', pg_catalog.json_build_object(
                'kind', 'job', 'state', g.state, 'queue', g.queue, 'owner', g.owner, 'workflow_id', g.workflow_id,
                'ids', g.ids[chunk * 300 + 1 : chunk * 300 + 300])::text);
        END LOOP;
    END LOOP;
    CLOSE groups;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION pgsched.send_job_events() FROM PUBLIC;

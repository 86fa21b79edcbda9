-- pgsched schema, version 12: live events on the channel pgsched_events (DESIGN §8 "Wake-ups";
-- docs/api.md "Events"; docs/architecture.md says where the payload departs from DESIGN).
--
-- Heard by the API, which fans them out to SSE and WebSocket clients. Each payload is one small
-- JSON object naming its kind and listing rows, never more than PostgreSQL's 8,000 bytes:
--   {"kind":"job","rows":[[id, state, queue, owner, workflow_id], ...]}
--   {"kind":"schedule","rows":[[id, name, owner, queue, "insert"|"update"|"delete"]]}
--   {"kind":"queue","rows":[[name, paused, "insert"|"update"|"delete"]]}
-- Jobs are the volume (a worker completes thousands per second in batches), so their triggers are
-- statement-level with transition tables: one statement sends one NOTIFY per ~6,000 bytes of
-- changed rows, not one per row; an UPDATE sends only the rows whose state changed. Schedules and
-- queues change rarely: a row-level trigger each. As for every NOTIFY of pgsched, nothing is sent
-- while the notification queue is over half full: listeners poll (or resync), NOTIFY is a shortcut.

-- Sends the JSON rows of ``items`` (each at most 1,500 bytes: a longer one, which no constraint of
-- jobs allows, is left out rather than fail the caller's statement) on pgsched_events, in chunks:
-- a chunk starts each time the running total crosses a multiple of 6,000 bytes, so one holds under
-- 6,000 + 1,500 bytes of rows plus its envelope. A plain function called by the triggers below
-- (they run as whoever changed the rows, so it is granted to the roles that change them).
CREATE FUNCTION pgsched.notify_events(kind text, items text[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgsched, pg_temp AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('pgsched_events',
                                 '{"kind":"' || kind || '","rows":[' || pg_catalog.string_agg(c.item, ',' ORDER BY c.n) || ']}')
    FROM (SELECT u.item, u.n,
                 pg_catalog.sum(pg_catalog.octet_length(u.item) + 1) OVER (ORDER BY u.n) / 6000 AS chunk
          FROM pg_catalog.unnest(items) WITH ORDINALITY AS u(item, n)
          WHERE pg_catalog.octet_length(u.item) <= 1500) AS c
    GROUP BY c.chunk;
END
$$;
REVOKE ALL ON FUNCTION pgsched.notify_events(text, text[]) FROM PUBLIC;
COMMENT ON FUNCTION pgsched.notify_events(text, text[]) IS
    'Sends JSON rows on the channel pgsched_events in payloads under 8,000 bytes (called by the event triggers)';

-- Jobs: every inserted row, and every updated row whose state changed.
CREATE FUNCTION pgsched.send_job_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    items text[];
BEGIN
    IF pg_catalog.pg_notification_queue_usage() > 0.5 THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        items := ARRAY(SELECT pg_catalog.json_build_array(n.id, n.state, n.queue, n.owner, n.workflow_id)::text
                       FROM new_rows n);
    ELSE
        items := ARRAY(SELECT pg_catalog.json_build_array(n.id, n.state, n.queue, n.owner, n.workflow_id)::text
                       FROM new_rows n JOIN old_rows o ON o.id = n.id
                       WHERE n.state <> o.state);
    END IF;
    IF pg_catalog.cardinality(items) > 0 THEN
        PERFORM pgsched.notify_events('job', items);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_events_insert AFTER INSERT ON pgsched.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsched.send_job_events();
CREATE TRIGGER jobs_events_update AFTER UPDATE ON pgsched.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsched.send_job_events();

-- Schedules and queues: a row inserted, deleted, or changed in anything but the scheduler's own
-- bookkeeping (next_run_at, last_slot, updated_at: changed at every fire, which the job it
-- creates already tells).
CREATE FUNCTION pgsched.send_setting_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bookkeeping CONSTANT text[] := ARRAY['next_run_at', 'last_slot', 'updated_at'];
    changed jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
    action text := pg_catalog.lower(TG_OP);
    item json;
BEGIN
    IF TG_OP = 'UPDATE' AND (changed - bookkeeping) = (to_jsonb(OLD) - bookkeeping) THEN
        RETURN NULL;
    END IF;
    IF pg_catalog.pg_notification_queue_usage() > 0.5 THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'schedules' THEN
        item := pg_catalog.json_build_array(changed -> 'id', changed ->> 'name', changed ->> 'owner',
                                            changed ->> 'queue', action);
        PERFORM pgsched.notify_events('schedule', ARRAY[item::text]);
    ELSE
        item := pg_catalog.json_build_array(changed ->> 'name', changed -> 'paused', action);
        PERFORM pgsched.notify_events('queue', ARRAY[item::text]);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER schedules_events AFTER INSERT OR UPDATE OR DELETE ON pgsched.schedules
    FOR EACH ROW EXECUTE FUNCTION pgsched.send_setting_event();
CREATE TRIGGER queues_events AFTER INSERT OR UPDATE OR DELETE ON pgsched.queues
    FOR EACH ROW EXECUTE FUNCTION pgsched.send_setting_event();

-- Every role that may change jobs, schedules or queues fires these triggers.
GRANT EXECUTE ON FUNCTION pgsched.notify_events(text, text[])
    TO pgsched_enqueuer, pgsched_worker, pgsched_admin, pgsched_api, pgsched_owner;

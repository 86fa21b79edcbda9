-- pgsched schema, version 12: live events on the channel pgsched_events (DESIGN §8 "Wake-ups";
-- docs/api.md "Events"; docs/architecture.md says where the payload departs from DESIGN).
--
-- Heard by the API, which fans them out to SSE and WebSocket clients. Each payload is one small
-- JSON object, never more than PostgreSQL's 8,000 bytes:
--   {"kind": "job", "state", "queue", "owner", "workflow_id", "ids": [up to 300 job ids]}
--   {"kind": "schedule", "id", "name", "owner", "queue", "action": "insert"|"update"|"delete"}
--   {"kind": "queue", "name", "paused", "action"}
-- Jobs are the volume (a worker claims and completes thousands per second in batches), so their
-- triggers are statement-level with transition tables, and a statement's changed jobs are grouped
-- by (state, queue, owner, workflow_id): a batch completion of 1,000 jobs of one queue and owner is
-- 4 NOTIFYs, not 1,000, and only the ids cost anything per row. An UPDATE sends only the jobs whose
-- state changed. Schedules and queues change rarely: a row-level trigger each. As for every NOTIFY
-- of pgsched, nothing is sent while the notification queue is over half full: listeners resync or
-- poll; NOTIFY is only the shortcut.

-- Jobs: every inserted row, and every updated row whose state changed. 300 ids (19 digits at
-- most) and the longest group fields (an owner of 200 characters, escaped) stay under 8,000 bytes.
CREATE FUNCTION pgsched.send_job_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    groups refcursor;
    g record;
BEGIN
    IF pg_catalog.pg_notification_queue_usage() > 0.5 THEN
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
CREATE TRIGGER jobs_events_insert AFTER INSERT ON pgsched.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsched.send_job_events();
CREATE TRIGGER jobs_events_update AFTER UPDATE ON pgsched.jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsched.send_job_events();

-- Schedules and queues: a row inserted, deleted, or changed in anything but the scheduler's own
-- bookkeeping (next_run_at, last_slot, updated_at: changed at every fire, which the job it
-- creates already tells). A schedule whose owner or queue is absurdly long (no constraint bounds
-- them) is left out rather than fail the caller's statement.
CREATE FUNCTION pgsched.send_setting_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bookkeeping CONSTANT text[] := ARRAY['next_run_at', 'last_slot', 'updated_at'];
    changed jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
    action text := pg_catalog.lower(TG_OP);
    payload text;
BEGIN
    IF TG_OP = 'UPDATE' AND (changed - bookkeeping) = (to_jsonb(OLD) - bookkeeping) THEN
        RETURN NULL;
    END IF;
    IF pg_catalog.pg_notification_queue_usage() > 0.5 THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'schedules' THEN
        payload := pg_catalog.json_build_object('kind', 'schedule', 'id', changed -> 'id', 'name', changed -> 'name',
                                                'owner', changed -> 'owner', 'queue', changed -> 'queue',
                                                'action', action)::text;
    ELSE
        payload := pg_catalog.json_build_object('kind', 'queue', 'name', changed -> 'name',
                                                'paused', changed -> 'paused', 'action', action)::text;
    END IF;
    IF pg_catalog.octet_length(payload) < 8000 THEN
        PERFORM pg_catalog.pg_notify('pgsched_events', payload);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER schedules_events AFTER INSERT OR UPDATE OR DELETE ON pgsched.schedules
    FOR EACH ROW EXECUTE FUNCTION pgsched.send_setting_event();
CREATE TRIGGER queues_events AFTER INSERT OR UPDATE OR DELETE ON pgsched.queues
    FOR EACH ROW EXECUTE FUNCTION pgsched.send_setting_event();

-- Trigger functions run as whoever changed the rows, without an EXECUTE check: nobody calls them.
REVOKE EXECUTE ON FUNCTION pgsched.send_job_events(), pgsched.send_setting_event() FROM PUBLIC;
COMMENT ON FUNCTION pgsched.send_job_events() IS
    'Trigger: sends created jobs and state changes on pgsched_events, grouped, up to 300 ids a NOTIFY';
COMMENT ON FUNCTION pgsched.send_setting_event() IS
    'Trigger: sends schedule and queue changes on pgsched_events, one NOTIFY a row';

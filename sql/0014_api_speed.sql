-- pgsched schema, version 14: the REST API's data layer (issue 21).
--
-- * jobs_owner_idx: a member's job list (owner = $1 AND id < $cursor ORDER BY id DESC LIMIT n)
--   is a backward range scan of this index, first page or deep cursor alike. Without it the
--   planner walks the primary key backwards and filters by owner: fine for an owner with many
--   recent jobs, a scan of most of the table for one with few. Partial (owner IS NOT NULL):
--   jobs enqueued by the library without an owner (the worker's and the bulk path's common
--   case) cost it nothing.
-- * Row-level security on runs and run_logs, as on jobs: the API's login reads the attempts and
--   log lines of the jobs it may see only. runs carries its job's owner (copied by the worker
--   when it writes the row), so its policy is the jobs policy on its own column; run_logs has
--   no owner, so its policy asks whether the job is visible (a primary-key lookup in jobs,
--   under jobs' own policy). Every other pgsched group keeps seeing every row, as on jobs.

CREATE INDEX jobs_owner_idx ON pgsched.jobs (owner, id) WHERE owner IS NOT NULL;

ALTER TABLE pgsched.runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY runs_unrestricted ON pgsched.runs
    TO pgsched_worker, pgsched_enqueuer, pgsched_reader, pgsched_admin, pgsched_owner
    USING (true) WITH CHECK (true);
CREATE POLICY runs_api_read ON pgsched.runs FOR SELECT TO pgsched_api
    USING (pg_catalog.current_setting('pgsched.role', true) IN ('admin', 'operator')
           OR owner = NULLIF(pg_catalog.current_setting('pgsched.owner', true), ''));

ALTER TABLE pgsched.run_logs ENABLE ROW LEVEL SECURITY;
CREATE POLICY run_logs_unrestricted ON pgsched.run_logs
    TO pgsched_worker, pgsched_enqueuer, pgsched_reader, pgsched_admin, pgsched_owner
    USING (true) WITH CHECK (true);
CREATE POLICY run_logs_api_read ON pgsched.run_logs FOR SELECT TO pgsched_api
    USING (EXISTS (SELECT FROM pgsched.jobs j WHERE j.id = run_logs.job_id));

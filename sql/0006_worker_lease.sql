-- Placeholder so that 0007 applies on this branch (migrations are numbered without gaps).
-- DROP THIS FILE AT MERGE: the real 0006_worker_lease comes from another branch.
SELECT 1;

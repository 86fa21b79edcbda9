-- Placeholder so that 0007 applies on this branch (migrations are numbered without gaps).
-- DROP THIS FILE AT MERGE: the real 0005_placeholder comes from another branch.
SELECT 1;

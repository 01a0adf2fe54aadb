-- Voice calls keep their whole result with the attempt: a redelivered chunk whose call has
-- ended reports that result again instead of calling the debtor twice.
ALTER TABLE attempts ADD COLUMN result jsonb;

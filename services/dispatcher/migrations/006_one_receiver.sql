-- The bulk sender's device form promises one receiver per account: marking a device as the
-- receiver unmarks the previous one. The index makes two receivers impossible whatever the
-- code does; devices already marked twice keep only their newest mark, so it can be built.
UPDATE senders AS s
SET is_receiver = false, updated_at = now()
WHERE s.is_receiver AND s.deleted_at IS NULL
  AND EXISTS (SELECT 1 FROM senders AS newer
              WHERE newer.account_id = s.account_id AND newer.channel = s.channel
                AND newer.is_receiver AND newer.deleted_at IS NULL AND newer.id > s.id);

CREATE UNIQUE INDEX senders_one_receiver ON senders (account_id, channel)
    WHERE is_receiver AND deleted_at IS NULL;

-- Where a batch came from: the request id and W3C trace context of the request that created
-- it, as NATS headers ({"x-request-id": ..., "traceparent": ...}). The feeder releases the
-- batch long after that request, from another task or replica, and its chunks carry these
-- on, so the upload's logs and trace reach the provider's calls. '{}' when there was none.
ALTER TABLE batches ADD COLUMN origin jsonb NOT NULL DEFAULT '{}';

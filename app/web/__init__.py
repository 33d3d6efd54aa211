"""Flask plumbing every blueprint shares: errors, JSON, ids, auth, limits, SSE.

Error handlers, JSON in and out, the request id and per-request Call, auth, admission,
CORS, validation, the client watch, the SSE response, the OpenAPI document."""

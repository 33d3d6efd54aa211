"""Flask plumbing every blueprint shares: error handlers, JSON in and out, request ids,
auth, admission, CORS, validation, the client watch, the SSE response, the OpenAPI
document."""

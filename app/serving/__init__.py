"""Request to result, without Flask: one module per endpoint, and the shared pieces by name
(prompt rendering, token budget, usage, ids, the stream driver)."""

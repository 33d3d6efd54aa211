"""Structured outputs on flaskchat's worker: replies constrained to a JSON schema, a regex or
a list of choices, and tool calls (prompted, constrained and parsed)."""

"""Thin blueprints: parse, call one serving function, return."""

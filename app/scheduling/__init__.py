"""Sharing scarce model servers: how many requests each server takes at once (its
capacity), and, past that, which waiting request goes next (fair queuing across tenants,
OpenAI's service tiers)."""

"""Ids for completions and requests: 22 characters of shortuuid's alphabet, from os.urandom.

shortuuid.random() draws one character at a time through the secrets module; encoding
one 128-bit draw is several times cheaper on the per-request path.
"""
from __future__ import annotations

import os
import uuid

import shortuuid

_encoder = shortuuid.ShortUUID()


def new_id(prefix: str = "") -> str:
    return prefix + _encoder.encode(uuid.UUID(bytes=os.urandom(16)))

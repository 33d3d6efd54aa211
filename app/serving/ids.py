"""Ids for completions and requests: 22 characters of shortuuid's alphabet, from os.urandom.

shortuuid.random() draws one character at a time through the secrets module (~30 us), and
encoding a UUID costs ~6 us; mapping 22 random bytes through a table costs under 1 us.
(Bytes map to the 57 characters with a slight bias, which does not matter for ids.)
"""
from __future__ import annotations

import os

import shortuuid

_ALPHABET = shortuuid.get_alphabet().encode()
_TABLE = bytes(_ALPHABET[b % len(_ALPHABET)] for b in range(256))


def new_id(prefix: str = "") -> str:
    return prefix + os.urandom(22).translate(_TABLE).decode()

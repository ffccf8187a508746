"""Deterministic seeds derived from (base seed, purpose, index).

The official code reseeds torch from the clock whenever it builds a network, which makes runs
unrepeatable and silently resets the augmentation stream. pdd_ray never reseeds the global RNG
from the clock: every random stream is an explicit ``torch.Generator`` whose seed is a hash of
the base seed and the stream's purpose, so parallel and serial runs draw identical numbers.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(base: int, *parts: object) -> int:
    """A 63-bit seed that depends only on ``base`` and ``parts`` (e.g. ``"expert", 3``)."""
    text = "/".join([str(int(base)), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (random draws happen on the CPU, then move)."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g

"""The one way a seed is derived from a run's seed and a purpose.

`derive_seed(run_seed, "ppo", iteration)` is a stable hash of its parts, so every
consumer (data order, rollouts, evaluation samples) gets its own independent,
reproducible stream without coordinating offsets, on any machine and Python.
"""
from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' string forms (torch and `random` both take it)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1

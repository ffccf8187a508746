"""pdd_ray.allocator: freed activation-sized blocks stay in the process (no page faults on reuse)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = r"""
import resource, torch
from pdd_ray.allocator import keep_freed_memory
applied = keep_freed_memory()
def one_round():  # an unroll's pattern in miniature: several large tensors alive, then all freed
    tensors = [torch.ones(mib << 18) for mib in (64, 16, 64, 32, 64, 8)]
    del tensors
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # the heap grows to the working set (torch's 64-byte alignment needs a few rounds)
    one_round()
before = faults()
for _ in range(3):
    one_round()
print(applied, faults() - before)
"""


def _probe(env_value: str | None) -> tuple[bool, int]:
    env = {**os.environ}
    env.pop("PDD_RAY_MALLOC", None)
    if env_value is not None:
        env["PDD_RAY_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_reused_blocks_do_not_fault_again_and_the_opt_out_restores_glibc() -> None:
    applied, kept = _probe(None)
    left_alone, default = _probe("default")
    assert applied and not left_alone
    # glibc's default hands every block above 32 MiB back to the kernel when it is freed, so
    # each round faults the three 64 MiB tensors in again: 3 rounds x 3 x 16384 pages
    assert default > 3 * 3 * 16384 * 0.9
    assert kept < 1_000

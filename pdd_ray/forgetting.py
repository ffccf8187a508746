"""Forgetting scores (Toneva et al. 2019) and the easy real examples PDD's later stages drop.

PDD (§8 of docs/pdd-reference.md) discards easy-to-learn real examples in later stages; the
official code does not implement it, so this is our reconstruction:

* While an expert trains on real data, every example's prediction in the training forward
  pass of its minibatch is recorded once per epoch (:func:`pdd_ray.training.train`'s
  ``on_batch`` hook: no extra forward pass).
* A *forgetting event* is correct at epoch e-1 and wrong at epoch e. An example never
  classified correctly is *unlearnable*: the hardest of all, scored ``epochs + 1``.
* Counts are summed over the stage-1 experts; the ``floor(fraction * n)`` examples with the
  lowest totals (ties broken by a seeded permutation) are dropped from the real examples.

Each expert's counts live next to its trajectory as ``<key>/expert_NNNNN.forgetting.json``
(JSON, written atomically before the trajectory file, so a complete trajectory always has
its counts; stores written before counts existed simply lack the side file).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from pdd_ray.errors import PddError
from pdd_ray.experts.store import TrajectoryStore

__all__ = [
    "aggregate",
    "check_fraction",
    "counts_path",
    "drop_count",
    "forgetting_counts",
    "kept_indices",
    "read_counts",
    "scatter",
    "write_counts",
]

#: Version of the side-file layout below.
COUNTS_FORMAT = 1
#: Count of an example an expert did not train on (transition experts on a subset of the real examples).
NOT_TRAINED = -1


def forgetting_counts(correct: np.ndarray) -> np.ndarray:
    """Per-example forgetting events from an (epochs, n) correctness matrix.

    An event is correct at epoch e-1 -> incorrect at epoch e. Examples never correct in any
    epoch get ``epochs + 1``, more than any real count (at most ``epochs // 2``).
    """
    c = np.asarray(correct)
    if c.ndim != 2:
        raise PddError(f"correctness must be an (epochs, examples) matrix, got shape {c.shape}")
    c = c.astype(bool, copy=False)
    epochs = c.shape[0]
    events = (c[:-1] & ~c[1:]).sum(axis=0, dtype=np.int64)
    return np.where(c.any(axis=0), events, epochs + 1).astype(np.int64)


def aggregate(counts_per_expert: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of per-expert counts over experts (all over the same n examples)."""
    arrays = [np.asarray(c, dtype=np.int64) for c in counts_per_expert]
    if not arrays:
        raise PddError("no forgetting counts to aggregate: no experts recorded any")
    n = {a.shape for a in arrays}
    if len(n) != 1 or arrays[0].ndim != 1:
        raise PddError(f"forgetting counts of different shapes cannot be summed: {sorted(n)}")
    if any((a < 0).any() for a in arrays):
        raise PddError(
            "forgetting counts contain examples an expert never trained on; aggregate full-pool experts only"
        )
    return np.sum(arrays, axis=0, dtype=np.int64)


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float in [0, 1), or a one-line error naming the value."""
    ok = isinstance(fraction, (int, float, np.integer, np.floating)) and not isinstance(fraction, (bool, np.bool_))
    if not ok or not (0.0 <= float(fraction) < 1.0):  # NaN fails the comparison too
        raise PddError(
            f"discard fraction {fraction!r} is not in [0, 1): it is the share of real training examples "
            "dropped (0 keeps all of them)"
        )
    return float(fraction)


def drop_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)`` with ``fraction`` read as the decimal it prints as (0.29 * 100 = 29)."""
    return math.floor(Fraction(repr(check_fraction(fraction))) * int(n))


def kept_indices(counts: np.ndarray, fraction: float, seed: int, labels: np.ndarray | None = None,
                 min_per_class: int = 1) -> np.ndarray:
    """Sorted indices kept after dropping the lowest-count examples.

    Without ``labels``: exactly ``floor(fraction * n)`` of all examples. With ``labels`` the
    drop is stratified: each class c of n_c examples loses its ``floor(fraction * n_c)``
    lowest-count ones, but never so many that fewer than ``min_per_class`` remain (a
    globally ranked discard can empty a class, and a base method matching per class then
    has nothing to match). Ties are broken by a permutation seeded with ``seed``, so the
    result is deterministic.
    """
    c = np.asarray(counts)
    if c.ndim != 1:
        raise PddError(f"forgetting counts must be one value per example, got shape {c.shape}")
    n = c.shape[0]
    rank = np.empty(n, dtype=np.int64)
    rank[np.random.default_rng(int(seed)).permutation(n)] = np.arange(n)
    order = np.lexsort((rank, c))  # by count, then by the seeded rank
    if labels is None:
        return np.sort(order[drop_count(fraction, n):]).astype(np.int64)
    y = np.asarray(labels)
    if y.shape != c.shape:
        raise PddError(f"forgetting counts cover {n} examples but {y.shape[0]} labels were given")
    kept = []
    for cls in np.unique(y):
        in_class = order[y[order] == cls]  # this class's examples, easiest first
        drop = min(drop_count(fraction, in_class.shape[0]), max(0, in_class.shape[0] - int(min_per_class)))
        kept.append(in_class[drop:])
    return np.sort(np.concatenate(kept)).astype(np.int64)


def scatter(counts: np.ndarray, real_indices: np.ndarray | None, n: int) -> np.ndarray:
    """Counts over the subset ``real_indices`` of the real examples as a length-``n`` vector,
    ``NOT_TRAINED`` outside it (None: the counts already cover all ``n``)."""
    counts = np.asarray(counts, dtype=np.int64)
    if real_indices is None:
        return counts
    full = np.full(int(n), NOT_TRAINED, dtype=np.int64)
    full[np.asarray(real_indices, dtype=np.int64)] = counts
    return full


# --------------------------------------------------------------------------- side files


def counts_path(key: str, index: int) -> str:
    """Side file of expert ``index`` under ``key``, relative to the store root."""
    return f"{key}/expert_{int(index):05d}.forgetting.json"


def write_counts(store: TrajectoryStore, key: str, index: int, counts: np.ndarray, epochs: int) -> None:
    """Atomically store one expert's counts (length = all training examples)."""
    c = np.asarray(counts, dtype=np.int64)
    trained = c >= 0
    store.write_json(counts_path(key, index), {
        "format": COUNTS_FORMAT,
        "epochs": int(epochs),
        "examples": int(c.shape[0]),
        "trained_on": int(trained.sum()),
        "unlearned": int((c == epochs + 1).sum()),
        "never_forgotten": int((c == 0).sum()),
        "counts": c.tolist(),
    })


def read_counts(store: TrajectoryStore, key: str, index: int) -> np.ndarray | None:
    """Expert ``index``'s counts, or None when its store predates forgetting counts."""
    obj = store.read_json(counts_path(key, index))
    if obj is None:
        return None
    if obj.get("format") != COUNTS_FORMAT or not isinstance(obj.get("counts"), list):
        raise PddError(
            f"forgetting counts {store.root}/{counts_path(key, index)} have format {obj.get('format')!r}, "
            f"this pdd_ray reads {COUNTS_FORMAT}; re-run the experts with a fresh experts.storage"
        )
    return np.asarray(obj["counts"], dtype=np.int64)

"""Stage records: what a finished stage leaves in the run directory, and reading it back.

``stage_k/stage.npz`` holds the images, labels, losses and validation history; ``stage_k/manifest.json``
(written last, so it marks completion) holds α, the best iterate and the NPZ's SHA-256.
``real_examples.json`` counts the real examples each stage used.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pdd_ray.errors import PddError
from pdd_ray.integrity import verify_files
from pdd_ray.storage import Folder


@dataclass
class StageOutcome:
    """What a finished stage contributes: its images, labels, learned lr and history."""

    images: torch.Tensor
    labels: torch.Tensor
    alpha: float
    best_val_acc: float
    best_iteration: int
    losses: list[float]
    val_history: list[tuple[int, float]]
    soft_labels: torch.Tensor | None = None  # learned logits (DATM), None for hard labels
    validation_seconds: float = 0.0  # in-loop validation's share of the stage's time (0 when read from a record)
    step_seconds: float = 0.0  # the iterations' own share (update, all-reduce, optimiser); 0 when read from a record


def _write_json(path: Folder, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2))


def save_stage(directory: str | Path | Folder, k: int, out: StageOutcome) -> None:
    """Record stage k as finished: images first, manifest last (the manifest marks completion).

    The manifest lists the SHA-256 of ``stage.npz``, so :func:`load_stage` can tell a damaged
    record from a good one.
    """
    d = Folder.at(directory) / f"stage_{k}"
    soft = {"soft_labels": out.soft_labels.numpy()} if out.soft_labels is not None else {}
    buffer = io.BytesIO()
    np.savez(buffer, images=out.images.numpy(), labels=out.labels.numpy(),
             losses=np.array(out.losses, dtype=np.float64),
             val_history=np.array(out.val_history, dtype=np.float64).reshape(-1, 2), **soft)
    data = buffer.getvalue()
    (d / "stage.npz").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    _write_json(d / "manifest.json", {"stage": k, "done": True, "alpha": out.alpha,
                                      "best_val_acc": out.best_val_acc, "best_iteration": out.best_iteration,
                                      "sha256": {"stage.npz": digest}})


def load_stage(directory: str | Path | Folder, k: int) -> StageOutcome | None:
    """A finished stage's record, or None when stage k has not finished.

    A record that does not match its manifest's digest, or cannot be parsed, is a
    :class:`PddError`: training on damaged images would go unnoticed. Records written before
    digests existed (no ``sha256`` in the manifest) are read unverified.
    """
    directory = Folder.at(directory)
    d = directory / f"stage_{k}"
    if not (d / "manifest.json").is_file():
        return None
    fix = (f"delete {d} and re-run: the stage is finished again from its last checkpoint "
           f"({directory / 'train' / f'stage_{k}'}), or distilled again if that is gone")
    try:
        m = json.loads((d / "manifest.json").read_text())
        if not isinstance(m, dict):
            raise ValueError(f"holds a {type(m).__name__}, not an object")
        verified = verify_files(d, m["sha256"], f"stage record {d}", fix) if "sha256" in m else {}
        data = verified["stage.npz"] if "stage.npz" in verified else (d / "stage.npz").read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return StageOutcome(torch.from_numpy(z["images"].copy()), torch.from_numpy(z["labels"].copy()),
                                float(m["alpha"]), float(m["best_val_acc"]), int(m["best_iteration"]),
                                z["losses"].tolist(), [(int(i), float(a)) for i, a in z["val_history"]],
                                torch.from_numpy(z["soft_labels"].copy()) if "soft_labels" in z.files else None)
    except PddError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        why = " ".join(str(err).split())[:160]
        raise PddError(f"stage record {d} is truncated or corrupt ({type(err).__name__}: {why}); {fix}") from None


def record_real_examples(directory: str | Path | Folder, k: int, n: int, total: int, progress: bool = True) -> None:
    """Note that stage k used ``n`` of the ``total`` real training examples (forgetting-score discarding)."""
    path = Folder.at(directory) / "real_examples.json"
    counts = json.loads(path.read_text()) if path.is_file() else {}
    counts[f"stage_{k}"] = n
    _write_json(path, counts)
    if progress and n < total:
        tqdm.write(f"stage {k}: real pool {n} of {total} examples (distill.discard_fraction)")

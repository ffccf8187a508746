"""Training one expert and recording its trajectory (flat parameters after every epoch).

Shared by stage-1 experts (random init, real data) and PDD's transitions (start from an
expert's initial weights, train on the synthetic union S_<=k, then record real-data epochs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pdd_ray.device import pick_device
from pdd_ray.models import FlatModel
from pdd_ray.modelspec import ModelSpec, build_seeded
from pdd_ray.seeding import derive_seed, generator
from pdd_ray.training import TrainRecipe, accuracy, train


@dataclass
class Trajectory:
    """Recorded snapshots: row 0 is the starting point, row t the weights after t real epochs."""

    params: np.ndarray  # (rows, P) float32
    epochs: list[int]
    val_acc: list[float] = field(default_factory=list)  # per recorded row
    final_train_acc: float = float("nan")
    final_val_acc: float = float("nan")
    correct: np.ndarray | None = None  # (real epochs, n) bool: training-pass correctness (forgetting)


@dataclass
class Warmup:
    """Training on a synthetic union before the recorded phase (PDD's transition)."""

    images: torch.Tensor
    labels: torch.Tensor
    recipe: TrainRecipe


@dataclass
class RealSplits:
    """The real examples an expert trains on and the validation split it is scored on."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def record_trajectory(
    spec: ModelSpec,
    data: RealSplits,
    recipe: TrainRecipe,
    seed: int,
    keep_epochs: int,
    init_params: torch.Tensor | None = None,
    warmup: Warmup | None = None,
    use_gpu: bool = False,
) -> Trajectory:
    """Train one expert for ``recipe.epochs`` real-data epochs and keep snapshots 0..keep_epochs.

    The initialisation comes from ``init_params`` when given, else from ``seed`` alone, so
    the same (seed, settings) gives a bit-identical trajectory on any worker. ``warmup``
    trains on synthetic data first (its own optimiser); the recorded real-data phase then
    uses a fresh optimiser, as in the paper's transition. Every real-data epoch also records
    whether each training example was classified correctly in its minibatch's training
    forward pass (``Trajectory.correct``, for forgetting scores); the warm-up is not recorded.
    """
    train_x, train_y, val_x, val_y = data.train_x, data.train_y, data.val_x, data.val_y
    device = pick_device(use_gpu)
    model = build_seeded(spec, derive_seed(seed, "init")).to(device)
    flat = FlatModel(model)
    if init_params is not None:
        flat.load_flat(init_params.to(device))
    g = generator(derive_seed(seed, "data"))
    if warmup is not None:
        train(model, warmup.images, warmup.labels, warmup.recipe, g)
    rows = [flat.flatten().cpu().numpy()]
    epochs = [0]
    val_acc = [accuracy(model, val_x, val_y)]

    def on_epoch(e: int) -> None:
        if e + 1 <= keep_epochs:
            rows.append(flat.flatten().cpu().numpy())
            epochs.append(e + 1)
            val_acc.append(accuracy(model, val_x, val_y))

    correct = torch.zeros(recipe.epochs, train_x.shape[0], dtype=torch.bool, device=device)

    def on_batch(e: int, idx: torch.Tensor, ok: torch.Tensor) -> None:
        correct[e, idx] = ok  # stays on the device: no sync per batch

    train(model, train_x.to(device), train_y.to(device), recipe, g, on_epoch=on_epoch, on_batch=on_batch)
    return Trajectory(
        params=np.stack(rows).astype(np.float32, copy=False),
        epochs=epochs,
        val_acc=val_acc,
        final_train_acc=accuracy(model, train_x, train_y),
        final_val_acc=accuracy(model, val_x, val_y),
        correct=correct.cpu().numpy(),
    )


def load_start_params(params: np.ndarray) -> torch.Tensor:
    """A stored flat vector as a writable float32 tensor (store arrays may be read-only maps)."""
    return torch.from_numpy(np.array(params, dtype=np.float32, copy=True))

"""Soft labels: per-image logits instead of class indices (DATM's learned labels).

A stage with soft labels stores *logits* (N, classes); every network that trains on it (the
student's inner steps, in-loop validation, transitions, the progressive evaluator) uses soft
cross-entropy against their softmax, exactly DATM's ``SoftCrossEntropy``. Hard class indices
are kept beside them: they name each image's class (initialisation, grids, the hard-label
control row) and are what accuracy is measured against.

This module only turns labels into training targets and asks an expert for logits; it knows
nothing about stages or Ray, so ``evaluation`` and ``training`` can use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdd_ray.modelspec import ModelSpec


def soft_targets(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities softmax(logits): the target ``F.cross_entropy`` takes for soft CE
    (−Σ p log q / N, DATM's SoftCrossEntropy)."""
    return F.softmax(logits.float(), dim=1)


def union_targets(labels: list[torch.Tensor], soft: list[torch.Tensor | None], num_classes: int) -> torch.Tensor:
    """Training targets of a union of stages: class indices when no stage has soft labels,
    otherwise probabilities for every row (stages without soft labels count as one-hot)."""
    if all(s is None for s in soft):
        return torch.cat(labels)
    return torch.cat([
        soft_targets(s) if s is not None else F.one_hot(y.long(), num_classes).float()
        for y, s in zip(labels, soft, strict=True)
    ])


@torch.no_grad()
def expert_logits(spec: ModelSpec, params: torch.Tensor, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of the network ``spec`` with flat parameters ``params`` on ``x`` (eval mode, CPU)."""
    from pdd_ray.models import FlatModel

    model = spec.build()
    FlatModel(model).load_flat(params.detach().cpu().float())
    model.eval()
    out = [model(x[i : i + batch_size].cpu()) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, spec.num_classes)


def labeller_params(store_root: str, key: str, index: int, epoch: int | None) -> tuple[torch.Tensor, int]:
    """The labelling expert's flat parameters at ``epoch`` (None: its last recorded epoch, as
    DATM's ``Label_Model_Timestamp = -1``) and the epoch used."""
    from pdd_ray.experts.store import TrajectoryStore
    from pdd_ray.experts.trajectory import load_start_params

    with TrajectoryStore(store_root).open(key, index) as reader:
        e = reader.epochs[-1] if epoch is None else epoch
        return load_start_params(reader.params_at_epoch(e)), e

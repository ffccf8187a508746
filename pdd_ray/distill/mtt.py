"""Trajectory matching (MTT): one outer iteration's loss and gradients, as a pure function.

Given an expert's parameters at epoch t (θ_start) and t+E (θ*), a student starting at θ_start
takes ``syn_steps`` plain SGD steps with the learnable step size α on minibatches of the
synthetic union (with DSA), and the loss is ‖w_N − θ*‖² / ‖θ_start − θ*‖². Gradients flow
through the whole unroll to the *new* stage's images and to α. Earlier stages enter the
union as constant tensors, so they receive no gradient at all and stay bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdd_ray.augment import DiffAugment
from pdd_ray.models import FlatModel


@dataclass
class MatchResult:
    """Loss value and the gradients w.r.t. the new images and α."""

    loss: float
    grad_images: torch.Tensor
    grad_alpha: torch.Tensor


def minibatch_schedule(n: int, batch: int, steps: int, g: torch.Generator) -> list[torch.Tensor]:
    """Indices for ``steps`` minibatches walking random permutations of ``n`` items.

    As in MTT, a permutation is consumed in order and redrawn when used up, so every
    synthetic image is seen equally often across consecutive steps.
    """
    batch = min(batch, n)
    out: list[torch.Tensor] = []
    perm = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch > n:
            perm = torch.randperm(n, generator=g)
            pos = 0
        out.append(perm[pos : pos + batch])
        pos += batch
    return out


def unroll_loss(
    flat_model: FlatModel,
    start: torch.Tensor,
    target: torch.Tensor,
    frozen_images: torch.Tensor,
    frozen_labels: torch.Tensor,
    new_images: torch.Tensor,
    new_labels: torch.Tensor,
    alpha: torch.Tensor,
    syn_steps: int,
    batch_syn: int,
    dsa: DiffAugment,
    g: torch.Generator,
) -> torch.Tensor:
    """The normalised matching loss with the full differentiable unroll (graph kept in memory)."""
    images = torch.cat([frozen_images, new_images]) if frozen_images.numel() else new_images
    labels = torch.cat([frozen_labels, new_labels]) if frozen_labels.numel() else new_labels
    w = start.detach().clone().requires_grad_(True)
    for idx in minibatch_schedule(images.shape[0], batch_syn, syn_steps, g):
        idx = idx.to(images.device)
        x = images[idx]
        if dsa.enabled:
            x = dsa(x, generator=g)
        ce = F.cross_entropy(flat_model(w, x), labels[idx])
        (grad,) = torch.autograd.grad(ce, w, create_graph=True)
        w = w - alpha * grad
    return ((w - target) ** 2).sum() / ((start - target) ** 2).sum()


def match(
    flat_model: FlatModel,
    start: torch.Tensor,
    target: torch.Tensor,
    frozen_images: torch.Tensor,
    frozen_labels: torch.Tensor,
    new_images: torch.Tensor,
    new_labels: torch.Tensor,
    alpha: torch.Tensor,
    syn_steps: int,
    batch_syn: int,
    dsa: DiffAugment,
    g: torch.Generator,
) -> MatchResult:
    """Loss and gradients of one outer iteration; ``new_images`` and ``alpha`` must require grad."""
    loss = unroll_loss(
        flat_model, start, target, frozen_images, frozen_labels, new_images, new_labels, alpha, syn_steps, batch_syn, dsa, g
    )
    grad_images, grad_alpha = torch.autograd.grad(loss, [new_images, alpha])
    return MatchResult(loss=float(loss.detach()), grad_images=grad_images, grad_alpha=grad_alpha)

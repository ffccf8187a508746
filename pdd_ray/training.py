"""The one plain training loop pdd_ray uses everywhere: evaluation, baselines, experts, transitions.

Keeping a single loop means the random-subset baseline, the full-data baseline and the
distilled sets are trained by exactly the same code (field notes B15: peers compare against
numbers produced by a different recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdd_ray.augment import DiffAugment
from pdd_ray.sgd import SGD


@dataclass(frozen=True)
class TrainRecipe:
    """SGD settings for one training phase."""

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    lr_decay_at_half: bool = True
    augment: str = "none"


def make_optimizer(model: torch.nn.Module, recipe: TrainRecipe) -> SGD:
    """SGD over all parameters with the recipe's lr, momentum and weight decay.

    :class:`pdd_ray.sgd.SGD` is ``torch.optim.SGD(foreach=True)``'s update without importing
    TorchDynamo into every training process. foreach: one multi-tensor kernel per update term
    instead of a Python loop over the parameters (torch only picks it by itself on GPUs). The
    same arithmetic per element, so the weights are bit-identical to the per-parameter loop
    (tests/test_training.py); it saves per-step overhead in the many small trainings of a run
    (evaluation, baselines, validation, experts).
    """
    return SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def set_lr(optimizer: SGD, lr: float) -> None:
    """Change the learning rate while keeping momentum buffers (PDD's stage carry-over)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def train(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: TrainRecipe,
    generator: torch.Generator,
    optimizer: SGD | None = None,
    on_epoch: Callable[[int], None] | None = None,
    on_batch: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> SGD:
    """Train ``model`` in place on ``(x, y)`` for ``recipe.epochs`` shuffled epochs.

    ``y`` holds class indices, or class probabilities (N x classes, soft labels): cross-entropy
    then is the soft one, −Σ p log softmax(f(x)) averaged over the batch.

    ``optimizer`` may be passed in to continue with its momentum (progressive evaluation);
    its lr is then set to ``recipe.lr``. The lr drops x0.1 after half the epochs when
    ``lr_decay_at_half``. ``on_epoch(e)`` runs after each epoch (experts record parameters
    there). ``on_batch(e, idx, correct)`` gets, for every minibatch, the row indices into
    ``x`` and whether the training forward pass classified each row correctly (forgetting
    scores count on exactly this pass, Toneva et al. 2019); both stay on the model's device.
    It only reads the detached logits, so weights and the RNG stream are the same with or
    without it. Returns the optimizer so the caller can carry its state on.
    """
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    if optimizer is None:
        optimizer = make_optimizer(model, recipe)
    set_lr(optimizer, recipe.lr)
    dsa = DiffAugment(recipe.augment)
    n = x.shape[0]
    model.train()
    for epoch in range(recipe.epochs):
        if recipe.lr_decay_at_half and epoch == recipe.epochs // 2 and recipe.epochs > 1:
            set_lr(optimizer, recipe.lr * 0.1)
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            xb = x[idx]
            if dsa.enabled:
                xb = dsa(xb, generator=generator)
            yb = y[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_batch is not None:
                hard = yb.argmax(1) if yb.dim() == 2 else yb  # soft targets (probabilities): their top class
                on_batch(epoch, idx, logits.detach().argmax(1) == hard)
        if on_epoch is not None:
            on_epoch(epoch)
    return optimizer


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Predicted class of every row of ``x`` (eval mode, batched to bound memory)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    if x.shape[0] == 0:
        return float("nan")
    return (predict(model, x) == y.cpu()).float().mean().item()

"""DATM as a base method (Guo et al., ICLR 2024, "Towards Lossless Dataset Distillation via
Difficulty-Aligned Trajectory Matching"): MTT plus two ideas.

* **Learned soft labels.** Each new image carries learnable logits, initialised from an
  expert's logits on real images the expert classifies correctly (DATM's
  ``pix_init: samples_predicted_correctly``); the student's inner steps use soft cross-entropy
  against their softmax, and the logits take their own SGD step (``datm.lr_labels``,
  momentum ``datm.momentum_labels``) from the same matching loss. Earlier stages' logits are
  frozen like their images: they enter the unroll as constant targets.
* **Difficulty-aligned windows.** The start epoch is drawn from ``[lo, upper(it))``, where the
  upper bound grows linearly from ``datm.max_start_epoch`` to ``datm.max_start_epoch_final``
  over ``datm.expansion_iterations`` iterations (DATM's ``Sequential_Generation``), and every
  later PDD stage moves the whole window ``datm.stage_shift`` epochs later, so later stages
  match later (harder) phases of training.

With ``datm.soft_labels: false``, ``min_start_epoch: 0`` and no growth or shift this is MTT:
the same random draws in the same order, hence the same images for the same seed (tested).
"""

from __future__ import annotations

from typing import Any

import torch

from pdd_ray.distill.match import MatchProblem, UnrollSpec, match, unroll_loss
from pdd_ray.config import DatmConfig, DistillConfig
from pdd_ray.distill.methods.base import Conditioning, MethodContext, SettingsContext, Update
from pdd_ray.distill.methods.mtt import MttMethod
from pdd_ray.seeding import derive_seed, generator
from pdd_ray.soft_labels import expert_logits, labeller_params, soft_targets

#: real images per forward pass while looking for correctly classified ones
_LABEL_BATCH = 256


def window_bounds(cfg: Any, stage: int) -> tuple[int, int, int]:
    """(lo, initial upper, final upper) of stage ``stage``'s start-epoch window (upper exclusive)."""
    return _window(cfg.distill, cfg.datm, stage)


def _window(d: DistillConfig, w: DatmConfig, stage: int) -> tuple[int, int, int]:
    """:func:`window_bounds` from the two sections it reads."""
    upper = w.max_start_epoch if w.max_start_epoch is not None else d.max_start_epoch
    final = w.max_start_epoch_final if w.max_start_epoch_final is not None else upper
    shift = w.stage_shift * (stage - 1)
    return w.min_start_epoch + shift, upper + shift, final + shift


def datm_reach(cfg: Any) -> int:
    """Last epoch any stage's matching can touch (the trajectories must record it)."""
    _, upper, final = window_bounds(cfg, cfg.distill.num_stages)
    return max(upper, final) + cfg.distill.expert_epochs


def window_upper(settings: dict[str, Any], iteration: int) -> int:
    """The window's upper bound at ``iteration``: DATM's linear growth, capped at the final bound."""
    hi, final = settings["max_start_epoch"], settings["max_start_epoch_final"]
    grown = hi + int((final - hi) * iteration / settings["expansion_iterations"])
    return min(grown, final)


def correct_real_init(
    bundle: Any, spec: Any, logits_params: torch.Tensor, ipc: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ipc`` real images per class (class-major) that the labeller classifies correctly, in a
    seeded random order, with its logits on them. A class with fewer than ``ipc`` correct
    images is filled up with misclassified ones (DATM would loop forever)."""
    g = generator(derive_seed(seed, "datm-init", ipc))
    xs, ys, ls = [], [], []
    for c in range(bundle.num_classes):
        idx = torch.nonzero(bundle.train_y == c).flatten()
        if idx.numel() == 0:
            continue
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        good: list[torch.Tensor] = []
        good_logits: list[torch.Tensor] = []
        bad: list[tuple[torch.Tensor, torch.Tensor]] = []
        found = 0
        for s in range(0, idx.numel(), _LABEL_BATCH):
            chunk = idx[s : s + _LABEL_BATCH]
            logits = expert_logits(spec, logits_params, bundle.train_x[chunk])
            ok = logits.argmax(1) == c
            good.append(chunk[ok])
            good_logits.append(logits[ok])
            bad.append((chunk[~ok], logits[~ok]))
            found += int(ok.sum())
            if found >= ipc:
                break
        pick = torch.cat(good + [b[0] for b in bad])[:ipc]
        pick_logits = torch.cat(good_logits + [b[1] for b in bad])[:ipc]
        xs.append(bundle.train_x[pick])
        ys.append(bundle.train_y[pick])
        ls.append(pick_logits)
    return torch.cat(xs), torch.cat(ys), torch.cat(ls)


class DatmMethod(MttMethod):
    """MTT's unroll with learned soft labels and a difficulty-aligned, growing window."""

    name = "datm"
    section = "datm"

    def __init__(self, ctx: MethodContext, device: torch.device) -> None:
        super().__init__(ctx, device)
        frozen = ctx.sets.frozen_soft_labels
        self.frozen_t = soft_targets(frozen).to(device) if frozen is not None else None

    @classmethod
    def stage_settings(cls, ctx: SettingsContext, section: DatmConfig) -> dict[str, Any]:
        p = super().stage_settings(ctx, section)
        w = section
        lo, upper, final = _window(ctx.distill, w, ctx.stage)
        p.update({
            "min_start_epoch": lo, "max_start_epoch": upper, "max_start_epoch_final": final,
            "expansion_iterations": w.expansion_iterations or max(1, ctx.distill.iterations),
            "soft_labels": w.soft_labels, "lr_labels": w.lr_labels, "momentum_labels": w.momentum_labels,
            "label_epoch": w.label_epoch,
        })
        return p

    @classmethod
    def init_soft_labels(cls, settings, bundle, ipc, seed, spec, conditioning: Conditioning):
        """Stage k's labeller is the first of its conditioning networks (a stage-1 expert, or a
        transition expert trained on S_<k), at ``datm.label_epoch`` (default its last recorded epoch)."""
        if not settings["soft_labels"]:
            return None
        theta, _ = labeller_params(conditioning.store_root, conditioning.key, conditioning.indices[0],
                                   settings["label_epoch"])
        return correct_real_init(bundle, spec, theta, ipc, seed)

    def update(self, iteration: int, rank: int, new_images: torch.Tensor, alpha: torch.Tensor,
               g: torch.Generator) -> Update:
        p = self.settings
        pick = self.nets.indices[int(torch.randint(len(self.nets), (1,), generator=g))]
        lo = p["min_start_epoch"]
        t = lo + int(torch.randint(window_upper(p, iteration) - lo, (1,), generator=g))
        start = self.nets.weights(pick, t, self.device)
        target = self.nets.weights(pick, t + p["expert_epochs"], self.device)
        if self.soft_labels is None:  # hard labels: exactly MTT's matching
            problem = MatchProblem(self.flat_model, start, target, self.frozen_x, self.frozen_y, new_images,
                                   self.new_y)
            res = match(problem, alpha, UnrollSpec(p["syn_steps"], p["batch_syn"], self.dsa, p["unroll"]), g)
            return Update(res.loss, res.grad_images, res.grad_alpha)
        frozen_t = self.frozen_t if self.frozen_t is not None else soft_targets(self.soft_labels.detach())[:0]
        problem = MatchProblem(self.flat_model, start, target, self.frozen_x, frozen_t, new_images,
                               soft_targets(self.soft_labels))
        loss = unroll_loss(problem, alpha, UnrollSpec(p["syn_steps"], p["batch_syn"], self.dsa), g)
        gx, ga, gy = torch.autograd.grad(loss, [new_images, alpha, self.soft_labels])
        return Update(float(loss.detach()), gx, ga, gy)

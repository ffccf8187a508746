"""DM (distribution matching, Zhao & Bilen 2023) as a PDD base method.

DM needs no expert trajectories: each outer iteration it takes one network, and for every
class c it pulls the mean embedding (the classifier's input, ``model.embed``) of the class's
synthetic images towards the mean embedding of a batch of real images of that class:

    loss = Σ_c ‖ mean embed(DSA(real_c)) − mean embed(DSA(syn_c)) ‖²

Real and synthetic images of a class go through the *same* DSA transform (one shared draw,
"Siamese", as DM's ``DiffAugment(..., seed=s)`` does), and the network is used in train mode
with no gradient to its weights, as in DM.

PDD on top of DM:

* ``syn_c`` is the class's part of the whole union ``cat(frozen, new)``: earlier stages'
  images are in the mean (PDD matches the union's distribution), but they are constants, so
  only the new images get a gradient;
* the network: at stage 1 a fresh randomly initialised one every iteration, as DM does
  (seeded from the iteration's generator); at stage k > 1 one of the conditioning networks,
  i.e. networks already trained on S_<k by the transition (PDD's conditioning). DM would draw
  a fresh network per iteration; here the stage samples a *fixed* set of ``experts.num_experts``
  (or ``distill.transition_experts``) networks instead of training a new one on S_<k every
  iteration, because each conditioned network costs a full training run on the union
  (``distill.transition_syn_epochs``) — thousands of them per stage would dwarf the
  distillation itself.

Settings: the top-level ``dm`` section (``batch_real``, ``lr_img``). α is not learned: it stays
``distill.lr_init``, the stage's training lr for evaluation.
"""

from __future__ import annotations

from typing import Any

import torch

from pdd_ray.augment import DiffAugment
from pdd_ray.config import DistillConfig, DmConfig
from pdd_ray.distill.methods.base import BaseMethod, MethodContext, SettingsContext, Update
from pdd_ray.modelspec import build_seeded
from pdd_ray.models import FlatModel
from pdd_ray.seeding import generator

#: seeds for networks and augmentation draws are taken from ``g`` in [0, SEED_RANGE)
SEED_RANGE = 2**62


class DmMethod(BaseMethod):
    """Each worker draws a network (fresh at stage 1, conditioned later), then matches the
    per-class mean embeddings of a real batch and of the union's synthetic images."""

    name = "dm"
    learns_alpha = False
    needs_trajectories = False
    needs_real_data = True
    section = "dm"

    def __init__(self, ctx: MethodContext, device: torch.device) -> None:
        super().__init__(ctx, device)
        self.model = ctx.spec.build().to(device)
        self.model.train()  # DM embeds in train mode (matters for BatchNorm only)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.flat_model = FlatModel(self.model)
        self.dsa = DiffAugment(ctx.augment)
        self.frozen_x = ctx.sets.frozen_images.to(device)
        self.frozen_y = ctx.sets.frozen_labels.to(device)
        self.new_y = ctx.sets.new_labels.to(device)
        self.real_x, _, self.real_idx = self.load_real()
        self.num_classes = ctx.spec.num_classes
        self._weights_cache: dict[int, torch.Tensor] = {}

    @classmethod
    def stage_settings(cls, ctx: SettingsContext, section: DmConfig) -> dict[str, Any]:
        return {"batch_real": section.batch_real}

    @classmethod
    def image_lr(cls, distill: DistillConfig, section: DmConfig) -> float:
        return section.lr_img

    def _network(self, g: torch.Generator) -> None:
        """Load this iteration's network into ``self.model``: fresh (stage 1) or a conditioning network."""
        if not len(self.nets):
            seed = int(torch.randint(SEED_RANGE, (1,), generator=g))
            flat = FlatModel(build_seeded(self.ctx.spec, seed)).flatten().to(self.device)
        else:
            pick = self.nets.indices[int(torch.randint(len(self.nets), (1,), generator=g))]
            if pick not in self._weights_cache:
                self._weights_cache[pick] = self.nets.weights(pick, 0, self.device)
            flat = self._weights_cache[pick]
        self.flat_model.load_flat(flat)

    def update(self, iteration: int, rank: int, new_images: torch.Tensor, alpha: torch.Tensor,
               g: torch.Generator) -> Update:
        self._network(g)
        batch_real = self.settings["batch_real"]
        loss = new_images.new_zeros(())
        for c in range(self.num_classes):
            idx = self.real_idx[c]
            syn = torch.cat([self.frozen_x[self.frozen_y == c], new_images[self.new_y == c]])
            if idx.numel() == 0 or syn.shape[0] == 0:
                continue
            pick = idx[torch.randperm(idx.numel(), generator=g)[:batch_real]].to(self.device)
            aug_seed = int(torch.randint(SEED_RANGE, (1,), generator=g))  # one draw for real and syn
            with torch.no_grad():
                real = self.dsa(self.real_x[pick], generator(aug_seed), shared=True)
                mean_real = self.model.embed(real).mean(0)
            mean_syn = self.model.embed(self.dsa(syn, generator(aug_seed), shared=True)).mean(0)
            loss = loss + ((mean_real - mean_syn) ** 2).sum()
        grad = None
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss, new_images, allow_unused=True)
        if grad is None:  # no class had new images (cannot happen with ipc_per_stage >= 1)
            grad = torch.zeros_like(new_images)
        return Update(float(loss.detach()), grad.detach())

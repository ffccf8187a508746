"""MTT as a base method: match expert trajectories that start from models trained on S_<k."""

from __future__ import annotations

from typing import Any

import torch

from pdd_ray.augment import DiffAugment
from pdd_ray.distill.match import MatchProblem, UnrollSpec, batchable, match, match_many
from pdd_ray.distill.methods.base import BaseMethod, MethodContext, SettingsContext, Update
from pdd_ray.models import FlatModel


class MttMethod(BaseMethod):
    """Each worker draws an expert and a start epoch, unrolls ``syn_steps`` student steps on
    the union and differentiates the normalised parameter distance (``pdd_ray.distill.match``)."""

    name = "mtt"
    learns_alpha = True
    needs_trajectories = True

    def __init__(self, ctx: MethodContext, device: torch.device) -> None:
        super().__init__(ctx, device)
        self.flat_model = FlatModel(ctx.spec.build().to(device))
        self.dsa = DiffAugment(ctx.augment)
        self.frozen_x = ctx.sets.frozen_images.to(device)
        self.frozen_y = ctx.sets.frozen_labels.to(device)
        self.new_y = ctx.sets.new_labels.to(device)

    @classmethod
    def stage_settings(cls, ctx: SettingsContext, section: Any) -> dict[str, Any]:
        d = ctx.distill
        if d.batch_syn is not None:
            batch = d.batch_syn
        elif d.batch_syn_policy == "union":
            batch = ctx.num_classes * d.ipc_per_stage * ctx.stage
        else:  # the stage's new images: the paper's default
            batch = ctx.num_classes * d.ipc_per_stage
        return {"syn_steps": d.syn_steps, "expert_epochs": d.expert_epochs, "max_start_epoch": d.max_start_epoch,
                "batch_syn": batch, "unroll": d.unroll}

    def _problem(self, new_images: torch.Tensor, g: torch.Generator) -> MatchProblem:
        """Draw an expert and a start epoch from ``g``: the segment this sample matches."""
        p = self.settings
        pick = self.nets.indices[int(torch.randint(len(self.nets), (1,), generator=g))]
        t = int(torch.randint(p["max_start_epoch"], (1,), generator=g))
        start = self.nets.weights(pick, t, self.device)
        target = self.nets.weights(pick, t + p["expert_epochs"], self.device)
        return MatchProblem(self.flat_model, start, target, self.frozen_x, self.frozen_y, new_images, self.new_y)

    def _spec(self) -> UnrollSpec:
        p = self.settings
        return UnrollSpec(p["syn_steps"], p["batch_syn"], self.dsa, p["unroll"])

    def update(self, iteration: int, rank: int, new_images: torch.Tensor, alpha: torch.Tensor,
               g: torch.Generator) -> Update:
        res = match(self._problem(new_images, g), alpha, self._spec(), g)
        return Update(res.loss, res.grad_images, res.grad_alpha)

    def update_many(self, iteration: int, ranks: list[int], new_images: torch.Tensor, alpha: torch.Tensor,
                    gens: list[torch.Generator]) -> Update:
        """K samples unrolled together with the full unroll (``match_many``: one vmap); the
        memory-bounded unrolls run them one after another (the base class's mean)."""
        spec = self._spec()
        if len(gens) == 1 or not batchable(self.flat_model, spec):
            return super().update_many(iteration, ranks, new_images, alpha, gens)
        problems = [self._problem(new_images, g) for g in gens]
        res = match_many(problems, alpha, spec, gens)
        return Update(res.loss, res.grad_images, res.grad_alpha)

"""MTT as a base method: match expert trajectories that start from models trained on S_<k."""

from __future__ import annotations

from typing import Any

import torch

from pdd_ray.augment import DiffAugment
from pdd_ray.distill.match import MatchProblem, UnrollSpec, match
from pdd_ray.distill.methods.base import BaseMethod, Update
from pdd_ray.models import FlatModel


class MttMethod(BaseMethod):
    """Each worker draws an expert and a start epoch, unrolls ``syn_steps`` student steps on
    the union and differentiates the normalised parameter distance (``pdd_ray.distill.match``)."""

    name = "mtt"
    learns_alpha = True
    needs_trajectories = True

    def __init__(self, task, device: torch.device) -> None:
        super().__init__(task, device)
        self.flat_model = FlatModel(task.spec.build().to(device))
        self.dsa = DiffAugment(task.augment)
        self.frozen_x = task.frozen_images.to(device)
        self.frozen_y = task.frozen_labels.to(device)
        self.new_y = task.new_labels.to(device)

    @classmethod
    def stage_params(cls, cfg, num_classes: int, stage: int) -> dict[str, Any]:
        d = cfg.distill
        if d.batch_syn is not None:
            batch = d.batch_syn
        elif d.batch_syn_policy == "union":
            batch = num_classes * d.ipc_per_stage * stage
        else:  # the stage's new images: the paper's default
            batch = num_classes * d.ipc_per_stage
        return {"syn_steps": d.syn_steps, "expert_epochs": d.expert_epochs, "max_start_epoch": d.max_start_epoch,
                "batch_syn": batch, "unroll": d.unroll}

    def update(self, iteration: int, rank: int, new_images: torch.Tensor, alpha: torch.Tensor,
               g: torch.Generator) -> Update:
        p = self.params
        pick = self.pool.indices[int(torch.randint(len(self.pool), (1,), generator=g))]
        t = int(torch.randint(p["max_start_epoch"], (1,), generator=g))
        start = self.pool.params(pick, t, self.device)
        target = self.pool.params(pick, t + p["expert_epochs"], self.device)
        problem = MatchProblem(self.flat_model, start, target, self.frozen_x, self.frozen_y, new_images, self.new_y)
        res = match(problem, alpha, UnrollSpec(p["syn_steps"], p["batch_syn"], self.dsa, p["unroll"]), g)
        return Update(res.loss, res.grad_images, res.grad_alpha)

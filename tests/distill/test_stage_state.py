"""``StageState``: the one encoding of a stage checkpoint, a lossless round trip."""

from __future__ import annotations

import torch

from pdd_ray.distill.stage import Best, StageState


def _state(soft: bool) -> StageState:
    x = torch.randn(4, 1, 8, 8)
    opt = torch.optim.SGD([x.clone().requires_grad_(True)], lr=0.1, momentum=0.5)
    logits = torch.randn(4, 10) if soft else None
    return StageState(iteration=3, images=x, alpha=torch.tensor(0.01), opt_img=opt.state_dict(),
                      opt_lr=opt.state_dict(), best=Best(0.5, 2, x.clone(), 0.011, logits), losses=[1.0, 0.5, 0.25],
                      val_history=[(0, 0.1), (2, 0.5)], done=False, soft_labels=logits,
                      opt_labels=opt.state_dict() if soft else None, validation_seconds=1.5, step_seconds=2.5)


def test_round_trip_with_and_without_soft_labels():
    for soft in (False, True):
        state = _state(soft)
        d = state.to_checkpoint()
        assert ("soft_labels" in d) == soft and ("best_soft_labels" in d) == soft
        back = StageState.from_checkpoint(d)
        assert back.iteration == 3 and back.losses == state.losses and back.val_history == state.val_history
        assert torch.equal(back.images, state.images) and torch.equal(back.best.images, state.best.images)
        assert (back.best.acc, back.best.iteration, back.best.alpha) == (0.5, 2, 0.011)
        assert (back.soft_labels is None) == (not soft)
        assert back.validation_seconds == 1.5 and back.step_seconds == 2.5
        assert d.keys() == back.to_checkpoint().keys()


def test_checkpoints_from_before_the_timings_still_load():
    d = _state(False).to_checkpoint()
    del d["validation_seconds"], d["step_seconds"]
    back = StageState.from_checkpoint(d)
    assert back.validation_seconds == 0.0 and back.step_seconds == 0.0

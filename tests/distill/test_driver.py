"""The PDD stage driver end to end on tiny digits: stages, freezing, restart, resume, artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pdd_ray.config import load_config
from pdd_ray.distill import driver, transition
from pdd_ray.distill.artifact import load_distilled
from pdd_ray.distill.driver import distill
from pdd_ray.distill.identity import run_dir
from pdd_ray.distill.launch import FAIL_AT_ENV
from pdd_ray.distill.records import load_stage
from pdd_ray.distill.stage import ALPHA_FLOOR
from pdd_ray.prepare import prepare


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory, frozen_spy, tiny_overrides):
    """One tiny 2-stage run in which rank 0 raises once at iteration 3 of stage 1.

    It uses the memory-bounded "checkpoint" unroll, so the config → worker → match path of
    that mode (including its resume after the injected failure) runs end to end here; its
    gradient equals the full unroll's (tests/distill/test_unroll.py).
    """
    out = tmp_path_factory.mktemp("driver")
    # lr_img 0.001: with lr_lr = 1 and these 4-epoch experts, the preset's lr_img = 100 drives the
    # images to ~1e6 x the data's range by iteration 1, which the divergence guard (rightly) stops
    cfg = load_config("digits", tiny_overrides(str(out)) + ["distill.lr_lr=1.0", "distill.unroll=checkpoint",
                                                           "distill.lr_img=0.001"])
    prepared = prepare(cfg)
    mp = pytest.MonkeyPatch()
    mp.setenv(FAIL_AT_ENV, "3")
    try:
        with frozen_spy() as frozen_seen:  # what the driver handed each stage as frozen
            result = distill(cfg, prepared, progress=False)
    finally:
        mp.undo()
    result.frozen_seen = frozen_seen
    return cfg, prepared, result


@pytest.fixture(scope="module")
def uninterrupted(finished, tiny_overrides):
    """Stage 1 of the same settings without the injected failure (a one-stage run: stage 1
    does not depend on the stage count; the stage-1 experts are found in the same store)."""
    cfg, prepared, _ = finished
    one = load_config("digits", tiny_overrides(cfg.storage) + ["distill.lr_lr=1.0", "distill.unroll=checkpoint", "distill.lr_img=0.001",
                                                               "distill.num_stages=1"])
    return distill(one, prepared, progress=False)


def test_killed_worker_restarts_and_iterations_stay_continuous(finished):
    cfg, _, result = finished
    marker = run_dir(cfg) / "injected_failure.marker"
    assert marker.read_text() == "3"  # the failure really happened
    # restarted from the checkpoint at iteration 2: exactly `iterations` losses, no gap or repeat
    assert len(result.outcomes[0].losses) == cfg.distill.iterations
    assert np.isfinite(result.outcomes[0].losses).all()


def test_stage_time_splits_into_steps_validation_and_ray_train(finished):
    """``results.json``'s stage_k holds the iterations' own time (steps_k), the in-loop
    validation (validation_k) and, the rest, Ray Train's start and stop: all three positive."""
    cfg, _, result = finished
    for k in range(1, cfg.distill.num_stages + 1):
        stage, steps, validation = (result.seconds[f"{name}_{k}"] for name in ("stage", "steps", "validation"))
        assert steps > 0 and validation > 0, (k, steps, validation)
        assert steps + validation < stage, (k, steps, validation, stage)


def test_resumed_stage_equals_an_uninterrupted_one(finished, uninterrupted):
    """The restart replays nothing and skips nothing: images, α, losses and the selection are
    bit-identical to a run that never failed (CPU; see README on determinism)."""
    _, _, result = finished
    a, b = result.outcomes[0], uninterrupted.outcomes[0]
    assert torch.equal(a.images, b.images)
    assert a.alpha == b.alpha and a.best_iteration == b.best_iteration and a.best_val_acc == b.best_val_acc
    assert a.losses == b.losses
    assert a.val_history == b.val_history  # one row per evaluation, none repeated by the restart


def test_stages_shapes_frozen_and_alpha_positive(finished):
    cfg, prepared, result = finished
    classes = prepared.bundle.num_classes
    assert len(result.stages) == cfg.distill.num_stages
    for stage in result.stages:
        assert stage.images.shape == (classes * cfg.distill.ipc_per_stage, 1, 8, 8)
        assert stage.lr >= ALPHA_FLOOR * cfg.distill.lr_init > 0
    # α is learned (lr_lr = 1 in this fixture): every stage's last checkpoint holds an α moved away
    # from lr_init by more than float32 rounding (the selected α may be iteration 0's, when selection keeps it)
    for k in range(1, cfg.distill.num_stages + 1):
        states = [torch.load(p, map_location="cpu", weights_only=True)
                  for p in Path(result.directory, "train", f"stage_{k}").rglob("state.pt")]
        last = max(states, key=lambda st: int(st["iteration"]))
        assert abs(float(last["alpha"]) - cfg.distill.lr_init) > 1e-6, (k, float(last["alpha"]))
    # frozen: stage 1 optimised alone; stage 2 was handed exactly stage 1's finished images as
    # constants, and the artifact's stage 1 is those same images (stage 2 did not move them)
    recorded = load_stage(result.directory, 1)
    assert result.frozen_seen[1] == []
    assert len(result.frozen_seen[2]) == 1 and torch.equal(result.frozen_seen[2][0], recorded.images)
    art = load_distilled(result.artifact)
    assert torch.equal(art.stages[0].images, result.frozen_seen[2][0])
    # the stage-2 images start from a fresh init, not from stage 1's images
    assert not torch.equal(result.frozen_seen[2][0], result.outcomes[1].images)
    # the stage-2 experts descend from the stage-1 ones and are a different key
    assert len(result.expert_keys) == 2 and result.expert_keys[0] != result.expert_keys[1]
    # the second stage really learned new images (not a copy of the first)
    assert not torch.equal(result.stages[0].images, result.stages[1].images)


def test_artifact_round_trip(finished):
    cfg, prepared, result = finished
    art = load_distilled(result.artifact)
    assert len(art.stages) == cfg.distill.num_stages
    for a, b in zip(art.stages, result.stages):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.lr == b.lr
    assert art.spec == prepared.spec
    assert art.manifest["dataset"]["digest"] == prepared.bundle.digest
    assert (result.artifact / "grid_stage_1.png").is_file()
    assert art.images.shape[0] == sum(s.images.shape[0] for s in result.stages)


def test_second_run_does_no_distillation_work(finished, monkeypatch):
    cfg, prepared, result = finished

    def refuse(*a, **k):
        raise AssertionError("a finished run must not distill again")

    monkeypatch.setattr(driver, "run_stage", refuse)
    monkeypatch.setattr(transition, "produce", lambda *a, **k: [])  # transitions: nothing missing anyway
    again = distill(cfg, prepared, progress=False)
    for a, b in zip(again.stages, result.stages):
        assert torch.equal(a.images, b.images) and a.lr == b.lr


def test_refinished_stage_keeps_one_row_per_evaluation(finished):
    """Issue 17 item 6: stage 2's record deleted, the stage re-finished from its final checkpoint."""
    import shutil

    cfg, prepared, result = finished
    before = load_stage(result.directory, 2)
    shutil.rmtree(result.directory / "stage_2")
    again = distill(cfg, prepared, progress=False)
    after = load_stage(result.directory, 2)
    iterations = [i for i, _ in after.val_history]
    assert iterations == sorted(set(iterations)) == [0, 2, 4]  # eval_every 2, iterations 4: no repeated last row
    assert after.val_history == before.val_history and after.losses == before.losses
    assert torch.equal(again.stages[1].images, result.stages[1].images)

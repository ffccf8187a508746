"""DM (distribution matching) as a PDD base method: the update itself, then a tiny run end to end."""

from __future__ import annotations

import pytest
import torch

from pdd_ray.config import load_config
from pdd_ray.distill.artifact import load_distilled
from pdd_ray.distill.records import load_stage
from pdd_ray.distill.methods import METHODS, Conditioning, MethodContext, SettingsContext, StageSets, method_class
from pdd_ray.distill.methods.dm import DmMethod
from pdd_ray.experts.produce import expert_store_root
from pdd_ray.experts.store import TrajectoryStore
from pdd_ray.modelspec import ModelSpec, build_seeded
from pdd_ray.models import FlatModel
from pdd_ray.seeding import generator


CLASSES = 3
SPEC = ModelSpec("convnet", 1, CLASSES, 8, width=8, depth=2)


def _task(frozen_per_class: int = 1, new_per_class: int = 2, batch_real: int = 16, augment: str = "crop_scale_rotate",
          new: torch.Tensor | None = None, new_y: torch.Tensor | None = None):
    """A stage's method context: 20 real images per class whose classes differ in mean brightness."""
    g = generator(0)
    real_y = torch.arange(CLASSES).repeat_interleave(20)
    real_x = torch.randn(len(real_y), 1, 8, 8, generator=g) * 0.5 + real_y.view(-1, 1, 1, 1).float()
    frozen_y = torch.arange(CLASSES).repeat_interleave(frozen_per_class)
    if new_y is None:
        new_y = torch.arange(CLASSES).repeat_interleave(new_per_class)
    frozen_x = torch.randn(len(frozen_y), 1, 8, 8, generator=g)
    if new is None:
        new = torch.randn(len(new_y), 1, 8, 8, generator=g)
    ctx = MethodContext(
        stage=1, seed=0, spec=SPEC, augment=augment, settings={"batch_real": batch_real},
        sets=StageSets(frozen_images=frozen_x, frozen_labels=frozen_y, init_images=new.detach(), new_labels=new_y),
        conditioning=Conditioning("", None, []), real_ref=(real_x, real_y),
    )
    return ctx, new.clone().requires_grad_(True)


def _update(method: DmMethod, new: torch.Tensor, seed: int = 7):
    return method.update(0, 0, new, torch.tensor(0.01), generator(seed))


def test_registered_with_its_flags():
    assert method_class("dm") is DmMethod and METHODS["dm"] is DmMethod
    assert not DmMethod.learns_alpha and not DmMethod.needs_trajectories and DmMethod.needs_real_data
    cfg = load_config("digits", ["method=dm", "dm.batch_real=64", "dm.lr_img=3.0"])
    assert cfg.distill.method == "dm"
    assert DmMethod.image_lr(cfg.distill, cfg.dm) == 3.0
    assert DmMethod.stage_settings(SettingsContext(cfg.distill, 10, 2), cfg.dm) == {"batch_real": 64}


def test_embed_is_the_classifier_input():
    model = build_seeded(SPEC, 3)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model.classifier(model.embed(x)), model(x))


def test_loss_falls_under_gradient_steps_and_frozen_images_stay_constant():
    task, new = _task()
    frozen_before = task.sets.frozen_images.clone()
    method = DmMethod(task, torch.device("cpu"))
    first = _update(method, new)
    assert first.grad_alpha is None
    assert first.grad_images.shape == new.shape  # a gradient for the new images only
    assert (first.grad_images.flatten(1).abs().sum(1) > 0).all()  # every new image gets one
    losses = [first.loss]
    for _ in range(5):  # same generator seed: same network, real batch and augmentation
        res = _update(method, new)
        with torch.no_grad():
            new -= 1.0 * res.grad_images
        losses.append(_update(method, new).loss)
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(task.sets.frozen_images, frozen_before)  # frozen images are constants, never touched


def test_frozen_images_enter_the_class_means():
    task, new = _task(frozen_per_class=1)
    without, _ = _task(frozen_per_class=0, new=new.detach())
    a = _update(DmMethod(task, torch.device("cpu")), new)
    b = _update(DmMethod(without, torch.device("cpu")), new)
    assert a.loss != b.loss and not torch.equal(a.grad_images, b.grad_images)


def test_same_generator_seed_same_result():
    task, new = _task()
    a = _update(DmMethod(task, torch.device("cpu")), new, seed=11)
    b = _update(DmMethod(task, torch.device("cpu")), new, seed=11)
    c = _update(DmMethod(task, torch.device("cpu")), new, seed=12)
    assert a.loss == b.loss and torch.equal(a.grad_images, b.grad_images)
    assert a.loss != c.loss


def test_real_and_synthetic_share_one_augmentation_draw():
    # synthetic = exactly the real images of each class (shuffled): with the same transform for
    # both, the class means match whatever the drawn augmentation is
    task, _ = _task(frozen_per_class=0, batch_real=20, augment="crop_scale_rotate")
    real_x, real_y = task.real_ref
    perm = torch.randperm(len(real_y), generator=generator(1))
    task, new = _task(frozen_per_class=0, batch_real=20, new=real_x[perm], new_y=real_y[perm])
    method = DmMethod(task, torch.device("cpu"))
    for seed in range(5):
        assert _update(method, new, seed).loss < 1e-8
    assert _task(frozen_per_class=0, batch_real=20)[0].augment != "none"


def test_stage_one_draws_a_fresh_network_every_iteration():
    task, new = _task()
    method = DmMethod(task, torch.device("cpu"))
    _update(method, new, seed=1)
    w1 = method.flat_model.flatten()
    _update(method, new, seed=2)
    assert not torch.equal(w1, method.flat_model.flatten())


class _Nets:
    """Two known conditioning networks (stage k > 1)."""

    def __init__(self) -> None:
        self.indices = [4, 9]
        self.flat = {i: FlatModel(build_seeded(SPEC, 100 + i)).flatten() for i in self.indices}
        self.calls: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.indices)

    def weights(self, index: int, epoch: int, device: torch.device) -> torch.Tensor:
        self.calls.append((index, epoch))
        return self.flat[index].to(device)


def test_later_stages_use_the_conditioned_pool():
    task, new = _task()
    method = DmMethod(task, torch.device("cpu"))
    method.nets = pool = _Nets()
    used = set()
    for seed in range(8):
        _update(method, new, seed)
        w = method.flat_model.flatten()
        match = [i for i, f in pool.flat.items() if torch.equal(w, f)]
        assert len(match) == 1
        used.add(match[0])
    assert used == {4, 9}
    assert {e for _, e in pool.calls} == {0}  # snapshot 0: the network trained on S_<k
    assert len(pool.calls) == 2  # each member is read from the store once


# ----------------------------------------------------------------------------------------------
# end to end: two stages through the driver, the evaluator and the CLI table
# ----------------------------------------------------------------------------------------------

DM_OVERRIDES = ["method=dm", "dm.batch_real=32", "evaluation.epochs_per_stage=40", "distill.iterations=20",
                "distill.eval_every=10"]


@pytest.fixture(scope="module")
def dm_run(ray_session, tmp_path_factory, frozen_spy, tiny_overrides):
    from pdd_ray.pipeline import run

    out = tmp_path_factory.mktemp("dm")
    overrides = tiny_overrides(str(out)) + DM_OVERRIDES
    cfg = load_config("digits", overrides)
    with frozen_spy() as frozen_seen:  # what the driver handed each stage as frozen
        report = run(cfg, progress=False, baselines=False)
    return cfg, overrides, report, frozen_seen


def test_two_stages_frozen_alpha_and_no_experts(dm_run):
    cfg, _, report, frozen_seen = dm_run
    result = report.distilled
    assert len(result.stages) == 2 and len(result.outcomes) == 2
    assert result.expert_keys[0] is None and result.expert_keys[1] is not None  # fresh nets, then conditioned
    pool = TrajectoryStore(expert_store_root(cfg)).indices(result.expert_keys[1])
    assert len(pool) == cfg.experts.num_experts  # stage 2 embeds with networks trained on S_1
    lr_init32 = float(torch.tensor(cfg.distill.lr_init))  # α lives in a float32 tensor in the worker
    for out, stage in zip(result.outcomes, result.stages):
        assert out.alpha in (cfg.distill.lr_init, lr_init32) and stage.lr == out.alpha  # DM does not learn α
        assert len(out.losses) == cfg.distill.iterations and all(l == l for l in out.losses)
    # frozen: stage 2 was handed exactly stage 1's finished images, and the artifact's stage 1 is them
    recorded = load_stage(result.directory, 1)
    assert frozen_seen[1] == [] and len(frozen_seen[2]) == 1
    assert torch.equal(frozen_seen[2][0], recorded.images)
    assert torch.equal(load_distilled(result.artifact).stages[0].images, frozen_seen[2][0])
    assert not torch.equal(result.stages[0].images, result.stages[1].images)


def test_stage_moved_its_images_down_the_dm_objective(dm_run):
    """DM's update must improve on where the stage started: the final iterate of stage 1 (its
    last Train checkpoint) has a lower DM loss than the iteration-0 set on the same fresh
    networks, real batches and augmentations. With the update disabled the two sets are the
    same tensor and the losses equal. (Accuracy is not the yardstick here: at these tiny sizes
    selection may keep the iteration-0 set, which the final iterate does not depend on.)"""
    from pathlib import Path

    from pdd_ray.distill.stage import STATE_FILE
    from pdd_ray.evaluation import random_subset
    from pdd_ray.prepare import prepare
    from pdd_ray.seeding import derive_seed

    cfg, _, report, _ = dm_run
    prepared = prepare(cfg)
    b = prepared.bundle
    init_x, init_y = random_subset(b, cfg.distill.ipc_per_stage, derive_seed(cfg.seed, "stage-init", 1))
    states = [torch.load(p, map_location="cpu", weights_only=True)
              for p in Path(report.distilled.directory, "train", "stage_1").glob(f"checkpoint_*/{STATE_FILE}")]
    final = max(states, key=lambda s: int(s["iteration"]))
    assert int(final["iteration"]) == cfg.distill.iterations
    ctx = MethodContext(
        stage=1, seed=cfg.seed, spec=prepared.spec, augment=cfg.augment.strategy,
        settings={"batch_real": cfg.dm.batch_real},
        sets=StageSets(frozen_images=init_x[:0], frozen_labels=init_y[:0], init_images=init_x, new_labels=init_y),
        conditioning=Conditioning("", None, []), real_ref=(b.train_x, b.train_y),
    )
    method = DmMethod(ctx, torch.device("cpu"))

    def mean_loss(x: torch.Tensor) -> float:
        x = x.clone().requires_grad_(True)
        return sum(method.update(0, 0, x, torch.tensor(0.01), generator(1000 + s)).loss for s in range(8)) / 8

    start, end = mean_loss(init_x), mean_loss(final["images"])
    assert end < 0.9 * start, (start, end)


def test_cli_run_prints_the_table(dm_run, capsys):
    from pdd_ray.cli import main

    _, overrides, _, _ = dm_run
    # the same config finds its finished run: only evaluation and the baselines run again
    assert main(["run", "digits", *overrides, "--no-progress"]) == 0
    out = capsys.readouterr().out
    for row in ("random subset", "PDD stage 1", "PDD stage 2", "full data"):
        assert row in out
    # equal training budget: 2 stages x 40 epochs, so the random subset trains 80 in its one stage
    assert "training budget: 80 epochs per row (PDD 2 stages x 40, random subset 80 in one stage)" in out


def test_evaluate_artifact_reproduces_the_runs_numbers(dm_run, tmp_path, capsys):
    """``pdd-ray evaluate ARTIFACT`` (reevaluate.py) re-trains from the artifact alone: with the
    run's seed and run count it must give exactly the run's per-stage scores (same stages,
    per-stage lr, epochs and recipe), and print one row per stage."""
    import json

    import numpy as np

    from pdd_ray.cli import main

    cfg, _, report, _ = dm_run
    out = tmp_path / "re.json"
    assert main(["evaluate", str(report.distilled.artifact), "--runs", str(cfg.evaluation.runs), "--json", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "PDD stage 1 [convnet]" in printed and "PDD stage 2 [convnet]" in printed
    got = json.loads(out.read_text())["convnet"]["scores"]
    for split in ("val", "test"):
        np.testing.assert_array_equal(np.array(got[split]), report.pdd["convnet"].scores[split])
    # a bad architecture is a one-line error
    assert main(["evaluate", str(report.distilled.artifact), "--arch", "nope", "--no-progress"]) == 2
    assert "--arch 'nope'" in capsys.readouterr().err

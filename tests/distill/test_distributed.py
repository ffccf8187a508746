"""Two Ray Train workers of a real stage: each rank draws its own (expert, start epoch) sample,
and the step applied to the images is the one of the mean of their gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch

from pdd_ray.config import load_config
from pdd_ray.distill import identity, launch
from pdd_ray.distill.methods import method_class
from pdd_ray.distill.stage import STATE_FILE, StageTask, iteration_generator
from pdd_ray.experts.produce import expert_store_root, stage1_experts
from pdd_ray.prepare import prepare


@pytest.fixture(scope="module")
def two_workers(ray_session, tmp_path_factory, tiny_overrides):
    """One iteration of stage 1 on 2 workers; the StageTask the driver built is captured."""
    import ray.train.torch

    out = tmp_path_factory.mktemp("dist")
    cfg = load_config("digits", tiny_overrides(str(out)) + [
        "distill.num_workers=2", "distill.cpus_per_worker=1", "distill.iterations=1", "distill.num_stages=1",
        "distill.eval_every=1", "distill.lr_lr=1.0", "experts.num_experts=3", "distill.max_start_epoch=3"])
    prepared = prepare(cfg)
    key, _ = stage1_experts(cfg, prepared, progress=False)
    captured = {}
    real_trainer = ray.train.torch.TorchTrainer

    class Spy(real_trainer):
        def __init__(self, *a, train_loop_config=None, **k):
            captured["task"] = ray.get(train_loop_config["task"])
            super().__init__(*a, train_loop_config=train_loop_config, **k)
            captured["controller_config"] = self.train_run_context.train_loop_config

    mp = pytest.MonkeyPatch()
    mp.setattr(ray.train.torch, "TorchTrainer", Spy)
    try:
        directory = identity.run_dir(cfg)
        launch.run_stage(cfg, prepared, directory, 1, key, [], progress=False)
    finally:
        mp.undo()
    states = [torch.load(p, map_location="cpu", weights_only=True)
              for p in Path(directory, "train", "stage_1").glob(f"checkpoint_*/{STATE_FILE}")]
    final = next(s for s in states if int(s["iteration"]) == 1)
    return cfg, captured["task"], final, captured["controller_config"]


def _rank_update(task, rank: int):
    """What rank ``rank`` computes at iteration 0, in this process, recording the snapshots it reads."""
    method = method_class(task.method)(task.context, torch.device("cpu"))
    reads: list[tuple[int, int]] = []
    weights = method.nets.weights

    def recording(index, epoch, device):
        reads.append((int(index), int(epoch)))
        return weights(index, epoch, device)

    method.nets.weights = recording
    x = task.context.sets.init_images.clone().requires_grad_(True)
    alpha = torch.tensor(task.optimisation.lr_init, requires_grad=True)
    res = method.update(0, rank, x, alpha, iteration_generator(task.seed, task.stage, 0, rank))
    return reads, res


def test_two_workers_draw_different_samples_and_step_with_their_mean(two_workers):
    cfg, task, final, _ = two_workers
    init, opt = task.context.sets.init_images, task.optimisation
    threads = torch.get_num_threads()
    torch.set_num_threads(task.runtime.threads)  # as the workers did
    try:
        (reads0, r0), (reads1, r1) = _rank_update(task, 0), _rank_update(task, 1)
    finally:
        torch.set_num_threads(threads)
    # each rank read one start snapshot and its target E epochs later, and the ranks' samples differ
    assert len(reads0) == len(reads1) == 2
    assert reads0[1][1] - reads0[0][1] == cfg.distill.expert_epochs
    assert reads0 != reads1, "both workers drew the same (expert, start epoch): the rank is not in the seed"
    assert not torch.allclose(r0.grad_images, r1.grad_images)
    # the step the stage applied (SGD, first step: lr x gradient) used the mean of the two gradients
    mean_g = (r0.grad_images + r1.grad_images) / 2
    torch.testing.assert_close(final["images"], init - opt.lr_img * mean_g, rtol=1e-4, atol=1e-6)
    for one in (r0.grad_images, r1.grad_images):  # ... not one worker's alone
        assert not torch.allclose(final["images"], init - opt.lr_img * one, rtol=1e-4, atol=1e-6)
    mean_a = (r0.grad_alpha + r1.grad_alpha) / 2
    torch.testing.assert_close(final["alpha"], torch.clamp(opt.lr_init - opt.lr_lr * mean_a, min=1e-3 * opt.lr_init),
                               rtol=1e-4, atol=1e-9)


def test_one_worker_with_two_trajectories_steps_like_two_workers(two_workers, ray_session, tmp_path, tiny_overrides):
    """``distill.trajectories_per_worker=2`` on one worker draws ranks 0 and 1's samples and
    averages them in-process (vmapped unrolls): the same step as the two Ray Train workers."""
    cfg2, _, final2, _ = two_workers
    cfg = load_config("digits", tiny_overrides(str(tmp_path)) + [
        "distill.num_workers=1", "distill.trajectories_per_worker=2", "distill.cpus_per_worker=1",
        "distill.iterations=1", "distill.num_stages=1", "distill.eval_every=1", "distill.lr_lr=1.0",
        "experts.num_experts=3", "distill.max_start_epoch=3", f"experts.storage={expert_store_root(cfg2)}"])
    prepared = prepare(cfg)
    key, _ = stage1_experts(cfg, prepared, progress=False)
    directory = identity.run_dir(cfg)
    launch.run_stage(cfg, prepared, directory, 1, key, [], progress=False)
    states = [torch.load(p, map_location="cpu", weights_only=True)
              for p in Path(directory, "train", "stage_1").glob(f"checkpoint_*/{STATE_FILE}")]
    final = next(s for s in states if int(s["iteration"]) == 1)
    torch.testing.assert_close(final["images"], final2["images"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(final["alpha"], final2["alpha"], rtol=1e-4, atol=1e-9)


def test_the_stage_task_reaches_the_workers_by_reference_not_through_the_controller(two_workers):
    """Train unpickles ``train_loop_config`` in its controller: a task inline there made that
    process import torch for its tensors (about 4 s of CPU per stage); a reference is fetched
    by the workers alone, from one copy in the object store."""
    _, task, _, controller_config = two_workers
    assert set(controller_config) == {"task"}
    assert isinstance(controller_config["task"], ray.ObjectRef)
    assert isinstance(task, StageTask)


@pytest.mark.parametrize("unroll", ["full", "checkpoint"])
def test_update_many_is_the_mean_of_the_ranks_updates(two_workers, unroll):
    """K samples on one worker (vmapped with the full unroll, one by one with ``checkpoint``)
    average what ``update`` computes for each of those ranks alone."""
    _, task, _, _ = two_workers
    method = method_class(task.method)(task.context, torch.device("cpu"))
    method.settings = {**method.settings, "unroll": unroll}
    x = task.context.sets.init_images.clone().requires_grad_(True)
    alpha = torch.tensor(task.optimisation.lr_init, requires_grad=True)

    def gens():
        return [iteration_generator(task.seed, task.stage, 0, r) for r in (0, 1)]

    many = method.update_many(0, [0, 1], x, alpha, gens())
    ones = [method.update(0, r, x, alpha, g) for r, g in zip((0, 1), gens())]
    assert many.loss == pytest.approx((ones[0].loss + ones[1].loss) / 2, rel=1e-5)
    torch.testing.assert_close(many.grad_images, (ones[0].grad_images + ones[1].grad_images) / 2, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(many.grad_alpha, (ones[0].grad_alpha + ones[1].grad_alpha) / 2, rtol=1e-4, atol=1e-7)

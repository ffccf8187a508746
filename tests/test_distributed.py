"""Two Ray Train workers (gloo all-reduce) give the average of single-process gradients."""

from __future__ import annotations

import numpy as np
import torch

from pdd_ray.augment import DiffAugment
from pdd_ray.distill.match import match
from pdd_ray.models import FlatModel
from pdd_ray.modelspec import ModelSpec, build_seeded
from pdd_ray.seeding import generator

SPEC = ModelSpec("convnet", 1, 3, 8, width=8, depth=2)


def _sample_gradient(sample: int) -> tuple[np.ndarray, float]:
    """The matching gradient of one (expert, start) sample, fully determined by `sample`."""
    torch.manual_seed(0)
    fm = FlatModel(build_seeded(SPEC, 1))
    new_x = torch.randn(6, 1, 8, 8, requires_grad=True)
    new_y = torch.arange(6) % 3
    alpha = torch.tensor(0.01, requires_grad=True)
    g = generator(100 + sample)
    start = fm.flatten() + 0.01 * torch.randn(fm.numel, generator=g)
    target = start + 0.05 * torch.randn(fm.numel, generator=g)
    res = match(fm, start, target, new_x[:0].detach(), new_y[:0], new_x, new_y, alpha, 3, 3,
                DiffAugment("crop_scale_rotate"), g)
    return res.grad_images.numpy(), float(res.grad_alpha)


def _worker(config: dict) -> None:
    import ray.train

    from pdd_ray.distill.stage import _all_average

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    gi, ga = _sample_gradient(rank)
    avg_i, avg_a = _all_average([torch.from_numpy(gi), torch.tensor([ga])])
    if rank == 0:
        np.savez(config["out"], images=avg_i.numpy(), alpha=avg_a.numpy())
    ray.train.report({"done": 1})


def test_two_workers_average_the_gradients_of_one(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import sys

    import ray.cloudpickle

    # workers cannot import this test module: ship its functions by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "avg.npz"
    TorchTrainer(
        _worker,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="avg", storage_path=str(tmp_path / "train")),
    ).fit()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (g0, a0), (g1, a1) = _sample_gradient(0), _sample_gradient(1)
    finally:
        torch.set_num_threads(threads)
    assert not np.allclose(g0, g1)  # the two workers really computed different samples
    with np.load(out) as z:
        np.testing.assert_allclose(z["images"], (g0 + g1) / 2, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(z["alpha"][0], (a0 + a1) / 2, rtol=1e-5)

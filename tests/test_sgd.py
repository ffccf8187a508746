"""pdd_ray.sgd.SGD: torch.optim.SGD's update bit for bit, without importing TorchDynamo."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from pdd_ray.errors import PddError
from pdd_ray.sgd import SGD


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g).requires_grad_(True), torch.randn(3, generator=g).requires_grad_(True),
            torch.randn(2, 2, generator=g).requires_grad_(True)]


def _grads(params: list[torch.Tensor], step: int) -> None:
    """A different gradient each step; the last parameter has none on odd steps (skipped)."""
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if (i == 2 and step % 2) else torch.randn(p.shape, generator=g)


def _step_alike(ours: list[torch.Tensor], opt, theirs: list[torch.Tensor], ref, steps: range) -> None:
    """Give both parameter lists the same gradients each step, step both optimisers, and check
    that the parameters stay bit-identical."""
    for step in steps:
        _grads(ours, step)
        _grads(theirs, step)
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 5e-4), (0.5, 0.0), (0.0, 1e-2)])
def test_steps_equal_torch_sgd_bit_for_bit(foreach: bool, momentum: float, weight_decay: float) -> None:
    ours, theirs = _params(0), _params(0)
    opt = SGD(ours, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=momentum, weight_decay=weight_decay, foreach=foreach)
    _step_alike(ours, opt, theirs, ref, range(3))
    opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.01  # set between steps (evaluation's decay, a stage's α)
    _step_alike(ours, opt, theirs, ref, range(3, 6))
    assert not torch.equal(ours[0], _params(0)[0])  # it moved


def test_state_dict_continues_in_either_optimizer() -> None:
    ours, theirs = _params(1), _params(1)
    opt = SGD(ours, lr=0.05, momentum=0.9, weight_decay=1e-3)
    ref = torch.optim.SGD(theirs, lr=0.05, momentum=0.9, weight_decay=1e-3)
    _step_alike(ours, opt, theirs, ref, range(3))
    # swap: torch continues from our state, we continue from torch's (as checkpoints of either kind load)
    ours_next = SGD(ours, lr=1.0)
    ours_next.load_state_dict(ref.state_dict())
    ref_next = torch.optim.SGD(theirs, lr=1.0, momentum=0.9, weight_decay=1e-3)
    ref_next.load_state_dict(opt.state_dict())
    assert ours_next.param_groups[0]["lr"] == 0.05 and ref_next.param_groups[0]["lr"] == 0.05
    _step_alike(ours, ours_next, theirs, ref_next, range(3, 6))


def test_zero_grad_and_bad_input_give_one_line() -> None:
    params = _params(2)
    _grads(params, 0)
    opt = SGD(params, lr=0.1)
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    with pytest.raises(PddError, match=r"SGD lr=-0\.1 is invalid; expected a number >= 0"):
        SGD(params, lr=-0.1)
    with pytest.raises(PddError, match="SGD got 0 parameters"):
        SGD([], lr=0.1)
    with pytest.raises(PddError, match="groups of sizes \\[1\\] does not fit this SGD; expected one group of 3"):
        opt.load_state_dict(torch.optim.SGD(params[:1], lr=0.1).state_dict())
    with pytest.raises(PddError, match="nesterov=True is not supported"):
        opt.load_state_dict(torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True).state_dict())


def test_a_training_process_never_imports_torch_dynamo() -> None:
    """The point of the class: torch.optim's first call imports torch._dynamo (1.3 s here) in
    every process that trains. A fresh interpreter that imports the stage worker's module,
    trains a network with the shared loop and steps a stage's images stays without it."""
    script = textwrap.dedent("""
        import sys
        import torch
        import pdd_ray.distill.stage as stage
        from pdd_ray.modelspec import ModelSpec, build_seeded
        from pdd_ray.seeding import generator
        from pdd_ray.training import TrainRecipe, train
        model = build_seeded(ModelSpec("convnet", 1, 3, 8, width=4, depth=1), 0)
        x, y = torch.randn(6, 1, 8, 8), torch.arange(6) % 3
        train(model, x, y, TrainRecipe(epochs=2, lr=0.1, batch_size=4, augment="crop_scale_rotate"), generator(0))
        images = x.clone().requires_grad_(True)
        opt = stage.SGD([images], lr=1.0, momentum=0.5)
        images.grad = torch.ones_like(images)
        opt.step()
        state = opt.state_dict()
        print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "no dynamo"

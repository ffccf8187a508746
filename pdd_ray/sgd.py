"""SGD with momentum and weight decay: ``torch.optim.SGD``'s update, without ``torch.optim``.

Why: every method of ``torch.optim.Optimizer`` (construction, ``step``, ``zero_grad``, the state
dicts) is wrapped to keep TorchDynamo out, and the first call in a process imports
``torch._dynamo`` to do so: 1.3 s on this 2-core machine, nearly as long as importing torch.
pdd_ray trains in many fresh processes (each stage's Ray Train worker, the expert and
transition actors, the evaluation tasks), and each paid it before its first step. This class
does the same arithmetic with the same foreach kernels in the same order as
``torch.optim.SGD(..., foreach=True)`` with dampening 0, no Nesterov, no maximise: weights,
momentum buffers and learning-rate changes are bit-identical to it (``tests/test_sgd.py``), and
its state dict has torch's layout, so checkpoints load into either.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pdd_ray.errors import PddError


class SGD:
    """Minibatch SGD over ``params``: ``b ← μ b + (g + λ w)`` (``b = g + λ w`` at the first step),
    ``w ← w − lr · b``; without momentum ``w ← w − lr · (g + λ w)``.

    ``param_groups[0]["lr"]`` is read at every step, so an lr set there (``training.set_lr``)
    applies from the next step on, as with ``torch.optim``. Parameters without a gradient are
    skipped and keep their buffer.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.params = list(params)
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise PddError(f"SGD {name}={value!r} is invalid; expected a number >= 0")
        if not self.params or not all(isinstance(p, torch.Tensor) for p in self.params):
            raise PddError(f"SGD got {len(self.params)} parameters; expected one tensor or more")
        self.param_groups = [{"lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay),
                              "params": self.params}]
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients (``set_to_none=False`` zeroes them in place instead)."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient (torch's multi-tensor SGD, op for op)."""
        group = self.param_groups[0]
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        index = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not index:
            return
        params = [self.params[i] for i in index]
        grads = [self.params[i].grad for i in index]
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if momentum != 0:
            bufs = [self.momentum_buffers[i] for i in index]
            if all(b is not None for b in bufs):
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads, alpha=1.0)
            else:  # torch's path when any buffer is new: per tensor, a copy of the gradient to start
                for j, i in enumerate(index):
                    if bufs[j] is None:
                        bufs[j] = self.momentum_buffers[i] = grads[j].detach().clone()
                    else:
                        bufs[j].mul_(momentum).add_(grads[j], alpha=1.0)
            grads = bufs
        torch._foreach_add_(params, grads, alpha=-lr)

    def state_dict(self) -> dict:
        """``torch.optim.SGD.state_dict()``'s layout: momentum buffers by parameter index (the
        buffers themselves, not copies, as torch returns them), and the one parameter group."""
        group = self.param_groups[0]
        return {
            "state": {i: {"momentum_buffer": b} for i, b in enumerate(self.momentum_buffers) if b is not None},
            "param_groups": [{"lr": group["lr"], "momentum": group["momentum"], "dampening": 0.0,
                              "weight_decay": group["weight_decay"], "nesterov": False, "maximize": False,
                              "foreach": True, "differentiable": False, "fused": None,
                              "params": list(range(len(self.params)))}],
        }

    def load_state_dict(self, state: dict) -> None:
        """Take the buffers and hyperparameters of a state dict from :meth:`state_dict` or from
        ``torch.optim.SGD`` (one group, as many parameters in the same order)."""
        groups = state.get("param_groups", [])
        if len(groups) != 1 or len(groups[0].get("params", [])) != len(self.params):
            sizes = [len(g.get("params", [])) for g in groups]
            raise PddError(f"optimizer state with parameter groups of sizes {sizes} does not fit this SGD; "
                           f"expected one group of {len(self.params)} parameters")
        group = groups[0]
        for key, unsupported in (("dampening", 0), ("nesterov", False), ("maximize", False)):
            if group.get(key, unsupported) != unsupported:
                raise PddError(f"optimizer state with {key}={group[key]!r} is not supported; expected {unsupported!r}")
        for key in ("lr", "momentum", "weight_decay"):
            self.param_groups[0][key] = float(group[key])
        buffers: list[torch.Tensor | None] = [None] * len(self.params)
        for i, entry in state.get("state", {}).items():
            buf = entry.get("momentum_buffer")
            if buf is not None:
                p = self.params[int(i)]
                buffers[int(i)] = buf.detach().clone().to(device=p.device, dtype=p.dtype)
        self.momentum_buffers = buffers

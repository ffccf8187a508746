"""Trajectory matching (MTT): one outer iteration's loss and gradients, as a pure function.

Given an expert's parameters at epoch t (θ_start) and t+E (θ*), a student starting at θ_start
takes ``syn_steps`` plain SGD steps with the learnable step size α on minibatches of the
synthetic union (with DSA), and the loss is ‖w_N − θ*‖² / ‖θ_start − θ*‖². Gradients flow
through the whole unroll to the *new* stage's images and to α. Earlier stages enter the
union as constant tensors, so they receive no gradient at all and stay bit-identical.

Three ways to get those gradients (``UnrollSpec.mode``):

* ``"full"``: keep the whole second-order graph and call autograd once. Simple, but memory
  grows with ``syn_steps`` × batch × activations (≈ 20 GB at CIFAR shape, 100 images, 50 steps).
* ``"checkpoint"``: the *same* gradient, computed by an explicit reverse pass that replays one
  step at a time from stored weights; memory is one step's graph plus N flat weight vectors.
* ``"tesla"``: TESLA's constant-memory *approximation* (Cui et al. 2023), see ``_reverse``.

``match_many`` averages several problems that share the images (K trajectories on one
worker): with the full unroll, one ``torch.func.vmap`` over the K flat weight vectors and
minibatches, so K small unrolls become one K-times-larger batch of kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import grad as func_grad
from torch.func import vmap

from pdd_ray.augment import DiffAugment
from pdd_ray.errors import PddError
from pdd_ray.models import FlatModel
from pdd_ray.names import UNROLLS



@dataclass
class MatchProblem:
    """One matching problem: the student network, the expert segment it must reach (from
    ``start`` to ``target`` weights), and the synthetic union it trains on: the frozen stages
    (constants) first, then the new images being learned."""

    flat_model: FlatModel
    start: torch.Tensor
    target: torch.Tensor
    frozen_images: torch.Tensor
    frozen_labels: torch.Tensor
    new_images: torch.Tensor
    new_labels: torch.Tensor


@dataclass(frozen=True)
class UnrollSpec:
    """How the student trains inside one matching step: ``syn_steps`` SGD steps on minibatches
    of ``batch_syn`` union images with DSA ``dsa``, unrolled in ``mode`` (see the module docstring)."""

    syn_steps: int
    batch_syn: int
    dsa: DiffAugment
    mode: str = "full"


@dataclass
class MatchResult:
    """Loss value and the gradients w.r.t. the new images and α."""

    loss: float
    grad_images: torch.Tensor
    grad_alpha: torch.Tensor


def minibatch_schedule(n: int, batch: int, steps: int, g: torch.Generator) -> list[torch.Tensor]:
    """Indices for ``steps`` minibatches walking random permutations of ``n`` items.

    As in MTT, a permutation is consumed in order, in chunks of ``batch``, and redrawn when
    used up; its last chunk is kept even when shorter (``n mod batch`` images), as the
    official code does, so every image is seen exactly once per completed pass. (An earlier
    version skipped that short chunk, so with ``n`` not a multiple of ``batch`` -- e.g.
    CIFAR-100 IPC 50's 1000-image stage with ``batch_syn`` 512 -- some images missed every
    pass they were last in.) When ``batch`` divides ``n`` the draws are identical either way.
    """
    batch = min(batch, n)
    out: list[torch.Tensor] = []
    perm = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos >= n:
            perm = torch.randperm(n, generator=g)
            pos = 0
        out.append(perm[pos : pos + batch])
        pos += batch
    return out


def _device_schedule(n: int, batch: int, steps: int, g: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """The schedule's minibatches as views of one tensor on ``device``.

    One host-to-device copy for the whole unroll instead of one per step (each small copy
    synchronises a CUDA stream). Drawn exactly as ``minibatch_schedule``, so the generator
    advances identically in every unroll mode.
    """
    chunks = minibatch_schedule(n, batch, steps, g)
    return list(torch.cat(chunks).to(device).split([c.numel() for c in chunks]))


def _union(frozen: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Frozen stages first, then the new images (the index space of the schedule)."""
    return torch.cat([frozen, new]) if frozen.numel() else new


def _normaliser(start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖θ_start − θ*‖², the loss's denominator (a constant: experts are not optimised)."""
    return ((start - target) ** 2).sum()


def unroll_loss(p: MatchProblem, alpha: torch.Tensor, spec: UnrollSpec, g: torch.Generator) -> torch.Tensor:
    """The normalised matching loss with the full differentiable unroll (graph kept in memory)."""
    images = _union(p.frozen_images, p.new_images)
    labels = _union(p.frozen_labels, p.new_labels)
    w = p.start.detach().clone().requires_grad_(True)
    for idx in _device_schedule(images.shape[0], spec.batch_syn, spec.syn_steps, g, images.device):
        x = images[idx]
        if spec.dsa.enabled:
            x = spec.dsa(x, generator=g)
        ce = F.cross_entropy(p.flat_model(w, x), labels[idx])
        (grad,) = torch.autograd.grad(ce, w, create_graph=True)
        w = w - alpha * grad
    return ((w - p.target) ** 2).sum() / _normaliser(p.start, p.target)


@dataclass
class _Step:
    """What the reverse pass needs to replay one inner step exactly: its starting weights,
    its minibatch, and the generator state just before its DSA draw (None without DSA)."""

    w: torch.Tensor
    idx: torch.Tensor
    rng_state: torch.Tensor | None


def _step_grad(
    flat_model: FlatModel, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, create_graph: bool
) -> torch.Tensor:
    """∇_w CE(f(w, x), y); ``w`` must require grad."""
    ce = F.cross_entropy(flat_model(w, x), y)
    (grad,) = torch.autograd.grad(ce, w, create_graph=create_graph)
    return grad


def _forward_stored(
    flat_model: FlatModel,
    start: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    alpha: torch.Tensor,
    schedule: list[torch.Tensor],
    dsa: DiffAugment,
    g: torch.Generator,
) -> tuple[list[_Step], torch.Tensor]:
    """The unroll without a graph through the images: first-order steps only, keeping the
    per-step weights (N × |θ| floats, small next to activations) and DSA generator states.

    It consumes ``g`` exactly as ``unroll_loss`` does, so the caller's generator ends in the
    same state whichever mode ran.
    """
    a = alpha.detach()
    w = start.detach()
    steps: list[_Step] = []
    for idx in schedule:
        state = g.get_state() if dsa.enabled else None
        x = images[idx]
        if dsa.enabled:
            x = dsa(x, generator=g)
        grad = _step_grad(flat_model, w.requires_grad_(True), x, labels[idx], create_graph=False)
        w = w.detach()
        steps.append(_Step(w, idx, state))
        w = w - a * grad
    return steps, w


def _reverse(
    flat_model: FlatModel,
    steps: list[_Step],
    v: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    alpha: torch.Tensor,
    dsa: DiffAugment,
    exact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. the whole union of images and α, replaying the steps last to first.

    With w_{i+1} = w_i − α g_i(w_i, X) and v = ∂L/∂w_{i+1}:
    ∂L/∂X += −α (∂g_i/∂X)ᵀ v,  ∂L/∂α += −⟨g_i, v⟩,  ∂L/∂w_i = v − α H_i v.

    ``exact`` (checkpoint) propagates v through every H_i, one autograd call per step for
    both the image term and the vector–Hessian product, so this equals the full unroll.
    Otherwise (TESLA) v stays the final ∂L/∂w_N: each step's images see only their direct
    path X → g_i, dropping the ∏(I − α H_j) coupling through later steps, and α's gradient
    is the closed form −⟨Σ g_i, v⟩. That is an approximation, exact only for one step.
    """
    a = alpha.detach()
    x_all = images.detach().requires_grad_(True)
    grad_x = torch.zeros_like(x_all)
    grad_a = torch.zeros_like(a)
    replay = torch.Generator(device=torch.device("cpu"))
    for step in reversed(steps):
        w = step.w.detach().requires_grad_(True)
        x = x_all[step.idx]
        if step.rng_state is not None:
            replay.set_state(step.rng_state)
            x = dsa(x, generator=replay)
        g_i = _step_grad(flat_model, w, x, labels[step.idx], create_graph=True)
        g_dot_v = torch.dot(g_i, v)
        if exact:
            hv, gx = torch.autograd.grad(g_dot_v, [w, x_all])
        else:
            (gx,) = torch.autograd.grad(g_dot_v, x_all)
        grad_x.sub_(a * gx)
        grad_a.sub_(g_dot_v.detach())
        if exact:
            v = v - a * hv
    return grad_x, grad_a


def _match_stored(p: MatchProblem, alpha: torch.Tensor, spec: UnrollSpec, g: torch.Generator,
                  exact: bool) -> MatchResult:
    """``match`` for the memory-bounded modes: stored forward, then the explicit reverse pass."""
    images = _union(p.frozen_images.detach(), p.new_images.detach())
    labels = _union(p.frozen_labels, p.new_labels)
    schedule = _device_schedule(images.shape[0], spec.batch_syn, spec.syn_steps, g, images.device)
    steps, w_n = _forward_stored(p.flat_model, p.start, images, labels, alpha, schedule, spec.dsa, g)
    denom = _normaliser(p.start.detach(), p.target.detach())
    diff = w_n - p.target.detach()
    loss = (diff**2).sum() / denom
    v = 2.0 * diff / denom  # ∂L/∂w_N in closed form
    grad_x, grad_a = _reverse(p.flat_model, steps, v, images, labels, alpha, spec.dsa, exact)
    # Frozen images were constants: their share of the union's gradient is simply dropped.
    grad_images = grad_x[p.frozen_images.shape[0] :] if p.frozen_images.numel() else grad_x
    return MatchResult(loss=float(loss), grad_images=grad_images, grad_alpha=grad_a.reshape(alpha.shape))


def _check_spec(spec: UnrollSpec) -> None:
    """One line naming a bad unroll mode, step count or batch size, before any work."""
    unroll = spec.mode
    if not isinstance(unroll, str) or unroll not in UNROLLS:
        raise PddError(f"unroll={unroll!r} is not a known unroll mode; expected one of {UNROLLS}")
    for name, value in (("syn_steps", spec.syn_steps), ("batch_syn", spec.batch_syn)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PddError(f"{name}={value!r} is invalid; expected an integer >= 1")


def match(p: MatchProblem, alpha: torch.Tensor, spec: UnrollSpec, g: torch.Generator) -> MatchResult:
    """Loss and gradients of one outer iteration; ``p.new_images`` and ``alpha`` must require grad.

    ``spec.mode`` (the unroll) picks how the gradient is computed (see the module docstring). "full" and
    "checkpoint" give the same numbers (to float rounding) and leave ``g`` in the same state;
    "checkpoint" pays an extra first-order forward/backward per step (about 1.3-1.5x the CPU
    time of "full") for memory that no longer holds every step's activations. "tesla" uses the
    same stored forward and skips only the vector-Hessian products, so it saves memory like
    "checkpoint" but little time, and its image and α gradients are approximate.
    """
    _check_spec(spec)
    if spec.mode != "full":
        return _match_stored(p, alpha, spec, g, exact=spec.mode == "checkpoint")
    loss = unroll_loss(p, alpha, spec, g)
    grad_images, grad_alpha = torch.autograd.grad(loss, [p.new_images, alpha])
    return MatchResult(loss=float(loss.detach()), grad_images=grad_images, grad_alpha=grad_alpha)


def batchable(flat_model: FlatModel, spec: UnrollSpec) -> bool:
    """Whether ``match_many`` can unroll several problems on this model together: only the full
    unroll is batched, and vmap cannot run modules that update buffers in place (BatchNorm's
    running statistics). Otherwise the caller runs ``match`` once per problem."""
    return spec.mode == "full" and next(flat_model.model.buffers(), None) is None


def _unroll_losses_batched(problems: list[MatchProblem], alpha: torch.Tensor, spec: UnrollSpec,
                           gens: list[torch.Generator]) -> torch.Tensor:
    """Each problem's ``unroll_loss``, all K unrolled together: the K weight vectors and
    minibatches go through one vmapped first-order gradient per step.

    Every generator is consumed exactly as ``unroll_loss`` consumes it (its whole schedule, then
    its DSA draws step by step), so trajectory k sees the minibatches and augmentations it would
    see alone. The schedule's chunk sizes depend only on (n, batch, steps), so step s has the same
    minibatch size in every trajectory and the K batches stack.
    """
    p0 = problems[0]
    images = _union(p0.frozen_images, p0.new_images)
    labels = _union(p0.frozen_labels, p0.new_labels)
    schedules = [_device_schedule(images.shape[0], spec.batch_syn, spec.syn_steps, g, images.device) for g in gens]

    def ce(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(p0.flat_model(w, x), y)

    batched_grad = vmap(func_grad(ce))
    starts = torch.stack([p.start.detach() for p in problems])
    w = starts.clone().requires_grad_(True)
    for s in range(spec.syn_steps):
        xs = []
        for sched, g in zip(schedules, gens):
            x = images[sched[s]]
            xs.append(spec.dsa(x, generator=g) if spec.dsa.enabled else x)
        ys = torch.stack([labels[sched[s]] for sched in schedules])
        w = w - alpha * batched_grad(w, torch.stack(xs), ys)
    targets = torch.stack([p.target.detach() for p in problems])
    return ((w - targets) ** 2).sum(1) / ((starts - targets) ** 2).sum(1)


def match_many(problems: list[MatchProblem], alpha: torch.Tensor, spec: UnrollSpec,
               gens: list[torch.Generator]) -> MatchResult:
    """The mean of ``match`` over problems that share the model and the images (they differ in
    their expert segment), one generator each: what as many workers would all-reduce.

    The unrolls are batched with vmap (same gradients to float rounding, tested against the
    one-by-one mean). Only where :func:`batchable` holds: the memory-bounded modes and models
    with buffers run ``match`` per problem instead (``BaseMethod.update_many`` averages them).
    """
    if len(problems) != len(gens) or not problems:
        raise PddError(f"match_many got {len(problems)} problems and {len(gens)} generators; expected as many of each, at least one")
    if not batchable(problems[0].flat_model, spec):
        raise PddError(f"match_many batches the full unroll of a model without buffers; got unroll {spec.mode!r}"
                       f"{' and a model with buffers' if spec.mode == 'full' else ''}: call match once per problem")
    _check_spec(spec)
    losses = _unroll_losses_batched(problems, alpha, spec, gens)
    loss = losses.mean()
    grad_images, grad_alpha = torch.autograd.grad(loss, [problems[0].new_images, alpha])
    return MatchResult(loss=float(loss.detach()), grad_images=grad_images, grad_alpha=grad_alpha)

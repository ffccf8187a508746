"""One PDD stage's synthetic-set optimisation: the per-worker loop run by Ray Train.

The loop is shared by every base method (``pdd_ray.distill.methods``); only the method's
``update`` differs. Workers are data-parallel over the method's random draws (MTT: expert and
start epoch; DM/IDC: networks and real batches): each holds the whole synthetic union,
computes its gradient, and the gradients are averaged with an all-reduce before the
(identical) optimiser step, so every worker keeps the same images.
One worker is exactly a single process. The ranks share the validation networks (each its
share side by side over its threads); rank 0 keeps the best images and writes checkpoints;
every random draw derives from (seed, stage, iteration, rank), so a restart from a checkpoint
continues the same sequence.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import ray
import ray.train
import torch
import torch.distributed as dist

from pdd_ray.allocator import keep_freed_memory
from pdd_ray.device import pick_device
from pdd_ray.distill.methods import BaseMethod, MethodContext, method_class
from pdd_ray.evaluation import StageSet, progressive_run
from pdd_ray.seeding import derive_seed, generator
from pdd_ray.sgd import SGD
from pdd_ray.storage import Folder
from pdd_ray.training import TrainRecipe

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ray import ObjectRef
    from ray.actor import ActorHandle

STATE_FILE = "state.pt"

#: α never drops below this fraction of its initial value: after every optimiser step α is
#: projected back onto [ALPHA_FLOOR * lr_init, ∞). A negative step size would make the student
#: ascend the loss (peers' users hit exactly this: MTT #16).
ALPHA_FLOOR = 1e-3


@dataclass(frozen=True)
class Optimisation:
    """How the new images (and α, and soft labels) are optimised, and when checkpoints are taken."""

    iterations: int
    lr_img: float
    lr_lr: float
    lr_init: float
    checkpoint_every: int
    image_limit: float | None = None  # largest |pixel| of the real data (divergence check)
    lr_labels: float = 0.0  # learned soft labels (DATM)
    momentum_labels: float = 0.0


@dataclass(frozen=True)
class Validation:
    """The in-loop validation that selects the stage's best iterate."""

    every: int
    runs: int
    recipe: TrainRecipe
    val_ref: ObjectRef | None  # (val_x, val_y) in the object store: shipped once per node, not per config copy


@dataclass(frozen=True)
class Runtime:
    """How a worker runs: threads, device, determinism, the progress actor and the test hooks."""

    use_gpu: bool
    threads: int = 1
    trajectories: int = 1  # samples per worker and iteration (distill.trajectories_per_worker)
    deterministic: bool = False  # torch.use_deterministic_algorithms (distill.deterministic)
    progress: ActorHandle | None = None  # ProgressBoard (rank 0 pushes iteration, loss, α, val acc)
    record: bool = False  # rank 0 records its metrics and images on ``progress`` for the driver's tracker
    fail_at: int | None = None  # test hook: rank 0 raises once at this iteration
    fail_marker: str | None = None
    problem_path: str | None = None  # rank 0 writes a non-finite/diverged stop's one-line reason here


@dataclass(frozen=True)
class StageTask:
    """Everything a worker needs for one stage (in the object store, its reference in
    ``train_loop_config``): the base method's name and what it sees (:class:`MethodContext`),
    the optimisation, the validation and how the worker runs."""

    method: str  # a key of pdd_ray.distill.methods.METHODS
    context: MethodContext
    optimisation: Optimisation
    validation: Validation
    runtime: Runtime

    @property
    def stage(self) -> int:
        return self.context.stage

    @property
    def seed(self) -> int:
        return self.context.seed


def use_deterministic(on: bool) -> None:
    """Deterministic kernels (``distill.deterministic``): on CPU a resumed stage is already
    bit-identical; on a GPU some kernels (atomics in convolution backward, scatter) are not,
    so a resumed or repeated run is only close unless this is on (slower). cuBLAS needs its
    workspace fixed before the first CUDA call for that."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)


def iteration_generator(seed: int, stage: int, iteration: int, rank: int) -> torch.Generator:
    """The random stream of one worker's update at one iteration: ranks draw different samples
    (MTT: expert and start epoch), and a restarted worker replays exactly the same draws."""
    return generator(derive_seed(seed, "stage", stage, "iter", iteration, "rank", rank))


def _all_average(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average tensors over all workers with one all-reduce (gloo on CPU, nccl on GPU)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    out, pos = [], 0
    for t in tensors:
        out.append(flat[pos : pos + t.numel()].view_as(t))
        pos += t.numel()
    return out


def shared_mean(runs: int, score: Callable[[int], float], device: torch.device, threads: int = 1) -> float:
    """Mean of ``score(r)`` for r < ``runs``, the runs dealt out over the workers.

    Why: validation trains ``eval_runs`` networks to the end, which at CIFAR or Tiny ImageNet
    size takes minutes to tens of minutes. Done on rank 0 alone it idles every other rank in
    the next all-reduce (and can outlast the process-group timeout). Rank i scores the runs
    r ≡ i (mod world); one all-reduce of the per-run vector (each entry filled by exactly one
    rank, zeros elsewhere) gives every rank all the scores, so they all select alike. Each
    run's seed and start depend on r only, so the mean equals a single worker's, bit for bit.
    Within a worker, its share goes side by side over its ``threads`` (:func:`score_side_by_side`).
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    scores = torch.zeros(runs, dtype=torch.float64, device=device)  # on the group's device (nccl: CUDA)
    mine = list(range(rank, runs, world))
    side_by_side = threads if device.type == "cpu" else 1  # one GPU: its own streams, no threads
    for r, value in zip(mine, score_side_by_side(mine, score, side_by_side)):
        scores[r] = value
    if distributed:
        dist.all_reduce(scores, op=dist.ReduceOp.SUM)
    values = scores.tolist()
    return float(sum(values) / len(values))


def score_side_by_side(runs: list[int], score: Callable[[int], float], threads: int) -> list[float]:
    """``score(r)`` for each of ``runs``, up to ``threads`` at once, each with ``threads // n``
    intra-op threads (n networks at once); in the order of ``runs``.

    Why: a worker with 2 CPUs trained its validation networks one after another on 2 intra-op
    threads, but small networks' operators (8x8 digits, narrow ConvNets) scale poorly over
    intra-op threads; two networks side by side, one thread each, finished 1.2-1.5x sooner
    (``benchmarks/validation.py``, README Performance). torch releases the GIL inside operators, so Python threads run them
    in parallel. Each run's result depends on r only (its own generator; initialisation under
    :func:`pdd_ray.modelspec.build_seeded`'s lock), so the scores are those of one after
    another at the same intra-op thread count.
    """
    at_once = min(threads, len(runs))
    if at_once <= 1:
        return [score(r) for r in runs]
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // at_once))  # process-wide: every thread's operators
    try:
        with ThreadPoolExecutor(at_once, thread_name_prefix="pdd-validation") as pool:
            return list(pool.map(score, runs))
    finally:
        torch.set_num_threads(before)


def validate(task: StageTask, union_x: torch.Tensor, union_y: torch.Tensor, alpha: float, method: BaseMethod,
             union_soft: torch.Tensor | None = None) -> float:
    """Mean validation accuracy of ``eval_runs`` networks trained on the union with lr α,
    shared out over the stage's workers (:func:`shared_mean`); every worker calls it.

    Networks start from the method's conditioning networks (random inits at stage 1, models already
    trained on S_<k later), so the in-loop check is itself progressive.
    """
    val_x, val_y = ray.get(task.validation.val_ref)
    train_x, train_y = method.decode(task.context.settings, union_x, union_y)

    reading = threading.Lock()  # runs go side by side in threads; the store's readers are not shared safely

    def run(r: int) -> float:
        with reading:
            init = method.validation_init(r)
        scores = progressive_run(
            task.context.spec,
            [StageSet(train_x, train_y, lr=alpha, soft_labels=union_soft)],
            task.validation.recipe,
            {"val": (val_x, val_y)},
            derive_seed(task.seed, "stage", task.stage, "validate", r),
            use_gpu=task.runtime.use_gpu,
            init_params=init,
        )
        return scores["val"][-1]

    return shared_mean(task.validation.runs, run, method.device, task.runtime.threads)


#: Where each base method's image learning rate is set (for the non-finite error's hint).
IMAGE_LR_KEY = {"mtt": "distill.lr_img", "dm": "dm.lr_img", "idc": "idc.lr_img"}

#: Metric a worker reports instead of a checkpoint when the stage went non-finite.
NONFINITE_METRIC = "nonfinite"


def nonfinite_problem(task: StageTask, iteration: int, **values: torch.Tensor | float | None) -> str | None:
    """A one-line description of the first non-finite value among ``values``, or None.

    Checked every iteration on the all-reduced loss and gradients (before the step) and on the
    images and α (after it): every worker sees the same values, so all stop together. A NaN
    must never reach a checkpoint, a stage record or the artifact; the usual cause is an image
    step so large that the student's weights overflow.
    """
    names = {"loss": "the matching loss", "grad_images": "the image gradient", "grad_alpha": "the gradient of α",
             "images": "the synthetic images", "alpha": "α", "grad_labels": "the soft labels' gradient",
             "soft_labels": "the soft labels"}
    for name, v in values.items():
        if v is None:
            continue
        t = torch.as_tensor(v)
        if not bool(torch.isfinite(t).all()):
            key = IMAGE_LR_KEY.get(task.method, "the method's image learning rate")
            opt = task.optimisation
            return (f"stage {task.stage}, iteration {iteration}: {names.get(name, name)} is not finite "
                    f"({'nan' if bool(torch.isnan(t).any()) else 'inf'}); likely cause: {key} = {opt.lr_img:g} is "
                    f"too large (or distill.lr_lr = {opt.lr_lr:g}); lower it and re-run (the stage resumes from its "
                    f"last finite checkpoint)")
    return None


#: Images more than this many times the largest real pixel magnitude have diverged: with
#: instance norm the network is blind to the scale of its input, so a far too large image lr
#: (``pdd-ray run digits distill.lr_img=1e12``) leaves the loss finite while the images grow
#: to ~1e9 and carry no information; that is an error too, not an artifact.
DIVERGED_FACTOR = 1e4


def diverged_problem(task: StageTask, iteration: int, images: torch.Tensor) -> str | None:
    """A one-line description when the images left the real data's range by ``DIVERGED_FACTOR``."""
    limit = task.optimisation.image_limit
    if limit is None:
        return None
    peak = float(images.detach().abs().max()) if images.numel() else 0.0
    if peak <= DIVERGED_FACTOR * limit:
        return None
    key = IMAGE_LR_KEY.get(task.method, "the method's image learning rate")
    return (f"stage {task.stage}, iteration {iteration}: the synthetic images diverged (max |x| = {peak:.3g}, "
            f"the real data lie within ±{limit:.3g}); likely cause: {key} = {task.optimisation.lr_img:g} is too "
            f"large; lower it and re-run")


@dataclass
class Best:
    """The best iterate on validation so far: what a finished stage returns."""

    acc: float
    iteration: int
    images: torch.Tensor
    alpha: float
    soft_labels: torch.Tensor | None = None  # learned logits (DATM), None for hard labels


@dataclass
class StageState:
    """One stage's whole state, as its Ray Train checkpoint (``state.pt``) holds it.

    The one place the checkpoint's dict is encoded and decoded: the worker restores from it,
    the driver reads the finished stage's best iterate from it. Tensors are on the CPU.
    """

    iteration: int  # iterations done
    images: torch.Tensor
    alpha: torch.Tensor
    opt_img: dict
    opt_lr: dict
    best: Best
    losses: list[float]
    val_history: list[tuple[int, float]]
    done: bool = False
    soft_labels: torch.Tensor | None = None  # learned logits (DATM) and their optimiser
    opt_labels: dict | None = None
    validation_seconds: float = 0.0  # rank 0's wall time in in-loop validation so far (benchmarks/run_time.py)
    step_seconds: float = 0.0  # rank 0's wall time in the iterations' own work so far (update, all-reduce, optimiser)

    def to_checkpoint(self) -> dict:
        """The checkpoint dict (tensors and plain values only, so it loads without pickle)."""
        labels = ({"soft_labels": self.soft_labels, "opt_labels": self.opt_labels,
                   "best_soft_labels": self.best.soft_labels} if self.soft_labels is not None else {})
        return {
            **labels,
            "iteration": self.iteration,
            "images": self.images,
            "alpha": self.alpha,
            "opt_img": self.opt_img,
            "opt_lr": self.opt_lr,
            "best_acc": self.best.acc,
            "best_iteration": self.best.iteration,
            "best_images": self.best.images,
            "best_alpha": self.best.alpha,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "val_history": torch.tensor(self.val_history, dtype=torch.float64).reshape(-1, 2),
            "done": self.done,
            "validation_seconds": self.validation_seconds,
            "step_seconds": self.step_seconds,
        }

    @classmethod
    def from_checkpoint(cls, s: dict) -> StageState:
        """The inverse of :meth:`to_checkpoint`."""
        soft = "soft_labels" in s
        best = Best(float(s["best_acc"]), int(s["best_iteration"]), s["best_images"], float(s["best_alpha"]),
                    s["best_soft_labels"] if soft else None)
        return cls(iteration=int(s["iteration"]), images=s["images"], alpha=s["alpha"], opt_img=s["opt_img"],
                   opt_lr=s["opt_lr"], best=best, losses=s["losses"].tolist(),
                   val_history=[(int(i), float(a)) for i, a in s["val_history"].tolist()],
                   done=bool(s.get("done", False)), soft_labels=s.get("soft_labels"), opt_labels=s.get("opt_labels"),
                   validation_seconds=float(s.get("validation_seconds", 0.0)),
                   step_seconds=float(s.get("step_seconds", 0.0)))

    @classmethod
    def load(cls, checkpoint: ray.train.Checkpoint) -> StageState:
        """A Ray Train checkpoint's state, loaded without pickle (``weights_only``)."""
        with checkpoint.as_directory() as d:
            return cls.from_checkpoint(torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True))

    def report(self, metrics: dict) -> None:
        """``ray.train.report`` the metrics with this state as the checkpoint (rank 0 only)."""
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(self.to_checkpoint(), Path(tmp) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class StageRun:
    """One worker's live stage: the new images, α and soft labels with their optimisers, the
    best iterate and the history. Every worker steps identically (on all-reduced gradients)."""

    def __init__(self, task: StageTask, rank: int, device: torch.device) -> None:
        self.task, self.rank, self.device = task, rank, device
        self.method = method_class(task.method)(task.context, device)
        sets, opt = task.context.sets, task.optimisation
        self.images = sets.init_images.clone().to(device).requires_grad_(True)
        self.alpha = torch.tensor(opt.lr_init, device=device, requires_grad=True)
        self.opt_img = SGD([self.images], lr=opt.lr_img, momentum=0.5)
        self.opt_lr = SGD([self.alpha], lr=opt.lr_lr, momentum=0.5)
        self.soft = sets.init_soft_labels is not None
        self.labels = sets.init_soft_labels.clone().float().to(device).requires_grad_(True) if self.soft else None
        self.method.soft_labels = self.labels
        self.opt_labels = (SGD([self.labels], lr=opt.lr_labels, momentum=opt.momentum_labels)
                           if self.soft else None)
        self.start = 0
        self.best = Best(-1.0, -1, self.images.detach().cpu().clone(), float(opt.lr_init),
                         self.labels.detach().cpu().clone() if self.soft else None)
        self.losses: list[float] = []
        self.val_history: list[tuple[int, float]] = []
        self.validation_seconds = 0.0
        self.step_seconds = 0.0

    def alpha_now(self) -> float:
        """α as a Python float; exactly ``lr_init`` for methods that do not learn it (the float32
        tensor would round 0.01 to 0.009999999776)."""
        return float(self.alpha.detach()) if self.method.learns_alpha else float(self.task.optimisation.lr_init)

    def restore(self, state: StageState) -> None:
        """Continue from a checkpoint: the same tensors, optimiser moments and history."""
        with torch.no_grad():
            self.images.copy_(state.images.to(self.device))
            self.alpha.copy_(state.alpha.to(self.device))
        self.opt_img.load_state_dict(state.opt_img)
        self.opt_lr.load_state_dict(state.opt_lr)
        self.start = state.iteration
        self.best = state.best
        if self.soft:
            with torch.no_grad():
                self.labels.copy_(state.soft_labels.to(self.device))
            self.opt_labels.load_state_dict(state.opt_labels)
        self.losses = state.losses
        self.val_history = state.val_history
        self.validation_seconds = state.validation_seconds
        self.step_seconds = state.step_seconds

    def state(self, iteration: int, done: bool = False) -> StageState:
        """A snapshot of the live state (CPU copies)."""
        return StageState(
            iteration=iteration, images=self.images.detach().cpu().clone(), alpha=self.alpha.detach().cpu().clone(),
            opt_img=self.opt_img.state_dict(), opt_lr=self.opt_lr.state_dict(), best=self.best,
            losses=self.losses, val_history=self.val_history, done=done,
            soft_labels=self.labels.detach().cpu().clone() if self.soft else None,
            opt_labels=self.opt_labels.state_dict() if self.soft else None,
            validation_seconds=self.validation_seconds, step_seconds=self.step_seconds,
        )

    def validate(self, it: int) -> float:
        """Rank 0: validation accuracy of the union now; keeps the best iterate."""
        task, sets = self.task, self.task.context.sets
        union_x = torch.cat([sets.frozen_images, self.images.detach().cpu()])
        union_y = torch.cat([sets.frozen_labels, sets.new_labels])
        union_s = torch.cat([sets.frozen_soft_labels, self.labels.detach().cpu()]) if self.soft else None
        t0 = time.perf_counter()
        val_acc = validate(task, union_x, union_y, self.alpha_now(), self.method, union_s)
        self.validation_seconds += time.perf_counter() - t0
        self.val_history.append((it, val_acc))
        if val_acc > self.best.acc:
            self.best = Best(val_acc, it, self.images.detach().cpu().clone(), self.alpha_now(),
                             self.labels.detach().cpu().clone() if self.soft else None)
        return val_acc

    def step(self, it: int) -> tuple[str | None, torch.Tensor, torch.Tensor]:
        """One iteration: the method's gradient, all-reduced, then the optimiser steps.

        Returns (the non-finite or divergence problem or None, the averaged loss, the averaged
        image gradient); with a problem before the step, nothing was changed.
        """
        task, device, soft = self.task, self.device, self.soft
        k = task.runtime.trajectories
        if k == 1:
            res = self.method.update(it, self.rank, self.images, self.alpha,
                                     iteration_generator(task.seed, task.stage, it, self.rank))
        else:  # sample j of rank r draws what rank r*K + j of a K-times-larger job would
            ranks = [self.rank * k + j for j in range(k)]
            gens = [iteration_generator(task.seed, task.stage, it, r) for r in ranks]
            res = self.method.update_many(it, ranks, self.images, self.alpha, gens)
        grad_a = res.grad_alpha.reshape(1) if res.grad_alpha is not None else torch.zeros(1, device=device)
        averaged = _all_average([res.grad_images, grad_a, torch.tensor([res.loss], device=device)]
                                + ([res.grad_labels] if soft else []))  # labels' gradients averaged like the images'
        grad_x, grad_a, loss_t = averaged[:3]
        problem = nonfinite_problem(task, it, loss=loss_t, grad_images=grad_x, grad_alpha=grad_a,
                                    grad_labels=averaged[3] if soft else None)
        if problem is not None:
            return problem, loss_t, grad_x
        self.images.grad = grad_x.contiguous()
        self.opt_img.step()
        if soft:
            self.labels.grad = averaged[3].contiguous()
            self.opt_labels.step()
        with torch.no_grad():
            self.method.project(self.images)
        if self.method.learns_alpha:
            self.alpha.grad = grad_a.reshape(())
            self.opt_lr.step()
            with torch.no_grad():
                self.alpha.clamp_(min=ALPHA_FLOOR * task.optimisation.lr_init)
        problem = (nonfinite_problem(task, it, images=self.images.detach(), alpha=self.alpha.detach(),
                                     soft_labels=self.labels.detach() if soft else None)
                   or diverged_problem(task, it, self.images))
        return problem, loss_t, grad_x


def _setup_worker(task: StageTask, rank: int) -> torch.device:
    """Threads, determinism and the torch seed of this worker; returns its device."""
    device = pick_device(task.runtime.use_gpu)
    keep_freed_memory()
    torch.set_num_threads(task.runtime.threads)  # Ray pins workers to 1 thread; use the CPUs reserved
    if task.runtime.deterministic:
        use_deterministic(True)
    torch.manual_seed(derive_seed(task.seed, "stage", task.stage, "worker", rank))
    return device


def _maybe_inject_failure(task: StageTask, it: int, rank: int) -> None:
    """Test hook (``FAIL_AT_ENV``): rank 0 raises once at ``runtime.fail_at``; the marker file
    makes the restarted worker go on."""
    rt = task.runtime
    if rt.fail_at is not None and it == rt.fail_at and rank == 0 and rt.fail_marker:
        marker = Folder.at(rt.fail_marker)
        if not marker.exists():
            marker.write_text(str(it))
            raise RuntimeError(f"injected failure at iteration {it}")


def _stop(task: StageTask, rank: int, it: int, problem: str, recorder: _Recorder | None) -> None:
    """Stop the stage without a checkpoint (the latest one is the last finite state)."""
    if recorder is not None:
        recorder.flush()
    if rank == 0 and task.runtime.problem_path:  # the driver turns it into a PddError (Train drops
        Folder.at(task.runtime.problem_path).write_text(problem)  # metrics reported without checkpoints)
    ray.train.report({"iteration": it, NONFINITE_METRIC: problem}, checkpoint=None)


def _report(run: StageRun, recorder: _Recorder | None, iteration: int, metrics: dict, done: bool = False) -> None:
    """Report ``metrics``; rank 0 with the state as a checkpoint, the others without."""
    if run.rank == 0:
        if recorder is not None:
            recorder.flush()
        run.state(iteration, done=done).report(metrics)
    else:
        ray.train.report(metrics, checkpoint=None)


class _Recorder:
    """Rank 0's metrics and images, recorded on the progress actor for the driver to log.

    Calls from one worker to one actor run in order, so waiting for the last one
    (:meth:`flush`, before every report) means every earlier record has arrived.
    """

    def __init__(self, board) -> None:
        self.board = board
        self.last = None

    def metrics(self, step: int, **values: float) -> None:
        self.last = self.board.record.remote("metrics", step, values)

    def images(self, step: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        # as NumPy arrays: tensors would make the progress actor import torch just to hold them
        # (about 4 CPU seconds per stage on 2 cores); the driver turns them back into tensors
        self.last = self.board.record.remote("images", step, (images.detach().cpu().numpy(), labels.cpu().numpy()))

    def flush(self) -> None:
        if self.last is not None:
            ray.get(self.last)
            self.last = None


def _stage_recorder(task: StageTask, rank: int) -> _Recorder | None:
    """Rank 0's recorder when the run is tracked, else None."""
    if rank != 0 or not task.runtime.record or task.runtime.progress is None:
        return None
    return _Recorder(task.runtime.progress)


def stage_worker(config: dict) -> None:
    """Ray Train ``train_loop_per_worker`` for one stage.

    Restore from the latest checkpoint; then per iteration: validate (every ``eval_every`` and
    at the end, the networks shared out over the ranks), step on the all-reduced gradient,
    report, and checkpoint every ``checkpoint_every``. A non-finite value stops every worker
    without a checkpoint.
    """
    task: StageTask = ray.get(config["task"])
    rank = ray.train.get_context().get_world_rank()
    run = StageRun(task, rank, _setup_worker(task, rank))
    try:
        _stage_loop(task, rank, run)
    finally:
        run.method.close()  # the conditioning networks' open store files (up to one per expert)


def _stage_loop(task: StageTask, rank: int, run: StageRun) -> None:
    """:func:`stage_worker`'s loop, from the restore to the final report."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        run.restore(StageState.load(checkpoint))
    recorder = _stage_recorder(task, rank)
    iterations, board = task.optimisation.iterations, task.runtime.progress
    val_acc = run.val_history[-1][1] if run.val_history else float("nan")
    evaluated = {i for i, _ in run.val_history}  # a finished stage's final checkpoint already holds its last row
    for it in range(run.start, iterations + 1):
        if (it % task.validation.every == 0 or it == iterations) and it not in evaluated:
            val_acc = run.validate(it)  # every rank trains its share of the validation networks
            if rank == 0 and board is not None:
                board.update.remote(val_acc=val_acc)
            if recorder is not None:
                recorder.metrics(it, val_acc=val_acc)
                recorder.images(it, run.images.detach().cpu().clone(), task.context.sets.new_labels)
        if it == iterations:
            break
        _maybe_inject_failure(task, it, rank)
        t0 = time.perf_counter()
        problem, loss_t, grad_x = run.step(it)
        run.step_seconds += time.perf_counter() - t0
        if problem is not None:
            _stop(task, rank, it, problem, recorder)
            return
        run.losses.append(float(loss_t))
        if rank == 0 and board is not None:
            board.update.remote(iteration=it + 1, loss=run.losses[-1], alpha=run.alpha_now())
        if recorder is not None:
            recorder.metrics(it + 1, loss=run.losses[-1], alpha=run.alpha_now(), grad_norm=float(grad_x.norm()))
        done_it = it + 1
        if done_it % task.optimisation.checkpoint_every == 0 and done_it < iterations:
            _report(run, recorder, done_it, {"iteration": done_it, "loss": run.losses[-1], "alpha": run.alpha_now(),
                                           "grad_norm": float(grad_x.norm()), "val_acc": val_acc,
                                           "best_val_acc": run.best.acc})
    final = {"iteration": iterations, "loss": run.losses[-1] if run.losses else float("nan"),
             "alpha": run.alpha_now(), "grad_norm": 0.0, "val_acc": val_acc, "best_val_acc": run.best.acc}
    _report(run, recorder, iterations, final, done=True)

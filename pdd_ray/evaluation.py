"""Progressive evaluation: train on S_1, then S_1 ∪ S_2, ... and report accuracy after each stage.

The same harness produces the baselines (a random real subset at the same images per class,
and the full training set), so every number in a pdd_ray table comes from one recipe. Runs
are independent seeds (independent initialisations, unlike the official code, which gave all
five evaluation networks the same weights) and run in parallel as Ray tasks.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from pdd_ray.config import EvalConfig
from pdd_ray.data.bundle import DatasetBundle
from pdd_ray.device import pick_device
from pdd_ray.errors import PddError
from pdd_ray.modelspec import ModelSpec, build_seeded
from pdd_ray.progress import log as progress_log
from pdd_ray.progress import time_left
from pdd_ray.seeding import derive_seed, generator
from pdd_ray.soft_labels import union_targets
from pdd_ray.storage import Folder
from pdd_ray.training import TrainRecipe, accuracy, train



@dataclass
class StageSet:
    """The images a stage adds, their labels and the learning rate used to train on the union.

    ``soft_labels`` (logits, N x classes; DATM) make every network train with soft
    cross-entropy against their softmax; ``labels`` still name each image's class.
    """

    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    epochs: int | None = None
    batch_size: int | None = None
    soft_labels: torch.Tensor | None = None


@dataclass
class EvalResult:
    """Accuracy per run and stage, for every evaluation split (e.g. ``val`` and ``test``)."""

    name: str
    arch: str
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # split -> (runs, stages)

    def mean(self, split: str = "test") -> np.ndarray:
        return self.scores[split].mean(axis=0)

    def std(self, split: str = "test") -> np.ndarray:
        # population std over runs, as the paper reports it
        return self.scores[split].std(axis=0)

    @property
    def final(self) -> tuple[float, float]:
        """(mean, std) test accuracy after the last stage, in percent."""
        return float(self.mean()[-1] * 100), float(self.std()[-1] * 100)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "arch": self.arch,
            "scores": {k: v.tolist() for k, v in self.scores.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        return cls(str(d["name"]), str(d["arch"]),
                   {k: np.asarray(v, dtype=np.float64) for k, v in d["scores"].items()})


@dataclass(frozen=True)
class EvalPlan:
    """How a set is evaluated: the training recipe, how many independent runs from which seed,
    and whether the optimiser's momentum carries across stages."""

    recipe: TrainRecipe
    runs: int
    seed: int
    carry_optimizer_state: bool = True


@dataclass(frozen=True)
class RunResources:
    """What each evaluation run asks Ray for (fractional GPUs let small runs share a device)."""

    cpus: float = 1.0
    gpus: float = 0.0

    @classmethod
    def of(cls, cfg: EvalConfig) -> RunResources:
        """``evaluation.cpus_per_run`` / ``gpus_per_run``."""
        return cls(cfg.cpus_per_run, cfg.gpus_per_run)


@dataclass(frozen=True)
class BaselineSetup:
    """What every baseline shares: the real data and model, the evaluation settings with the
    DSA strategy and seed, whether bars show, and where results are cached (None: not at all)."""

    bundle: DatasetBundle
    spec: ModelSpec
    cfg: EvalConfig
    augment: str
    seed: int
    progress: bool = True
    cache_dir: str | Path | Folder | None = None


def recipe_from_config(cfg: EvalConfig, augment: str) -> TrainRecipe:
    """The evaluation recipe; ``lr`` and ``epochs`` are overridden per stage."""
    return TrainRecipe(
        epochs=cfg.epochs_per_stage,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        lr_decay_at_half=cfg.lr_decay_at_half,
        augment=augment if cfg.augment else "none",
    )


def progressive_run(
    spec: ModelSpec,
    stages: list[StageSet],
    recipe: TrainRecipe,
    eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    seed: int,
    carry_optimizer_state: bool = True,
    use_gpu: bool = False,
    init_params: torch.Tensor | None = None,
) -> dict[str, list[float]]:
    """One evaluation run in this process: accuracy on each eval split after each stage.

    Stage k trains on the union of stages 1..k with stage k's lr (``StageSet.lr``), continuing
    the same network; with ``carry_optimizer_state`` the SGD momentum buffers carry over too,
    as in the paper's final evaluation. ``init_params`` (a flat vector) starts from given
    weights instead of a fresh initialisation.
    """
    from pdd_ray.allocator import keep_freed_memory
    from pdd_ray.models import FlatModel

    keep_freed_memory()
    device = pick_device(use_gpu)
    model = build_seeded(spec, derive_seed(seed, "init")).to(device)
    if init_params is not None:
        FlatModel(model).load_flat(init_params.to(device))
    g = generator(derive_seed(seed, "data"))
    optimizer = None
    scores: dict[str, list[float]] = {name: [] for name in eval_sets}
    union_x: list[torch.Tensor] = []
    union_y: list[torch.Tensor] = []
    union_soft: list[torch.Tensor | None] = []
    for stage in stages:
        union_x.append(stage.images.detach().cpu())
        union_y.append(stage.labels.detach().cpu())
        union_soft.append(stage.soft_labels.detach().cpu() if stage.soft_labels is not None else None)
        stage_recipe = replace(
            recipe,
            lr=stage.lr,
            epochs=stage.epochs or recipe.epochs,
            batch_size=stage.batch_size or recipe.batch_size,
        )
        optimizer = train(
            model,
            torch.cat(union_x),
            union_targets(union_y, union_soft, spec.num_classes),
            stage_recipe,
            g,
            optimizer=optimizer if carry_optimizer_state else None,
        )
        for name, (x, y) in eval_sets.items():
            scores[name].append(accuracy(model, x, y))
    return scores


_progressive_task = ray.remote(progressive_run)


class PendingEval:
    """Evaluation runs already submitted to Ray; :meth:`result` waits for them.

    Submitting several evaluations before waiting on any lets Ray fill every free CPU with
    whichever runs are queued: 5 runs on 2 cores leave one core idle for a whole run at the end
    of each evaluation done alone; the PDD evaluation and both baselines submitted together
    leave it idle once (``pipeline._run``). On 2 cores that measured no gain (README,
    Performance); with 15 or more CPUs all 15 runs go at once instead of in three phases.
    """

    def __init__(self, name: str, arch: str, runs: int, refs: list, splits: list[str], progress: bool,
                 on_result=None) -> None:
        self.name, self.arch, self.runs, self.progress = name, arch, runs, progress
        self.pending, self.splits, self.on_result = refs, splits, on_result
        self._result: EvalResult | None = None

    @classmethod
    def done(cls, result: EvalResult) -> PendingEval:
        """An evaluation with nothing to wait for (a cached baseline)."""
        out = cls(result.name, result.arch, 0, [], [], False)
        out._result = result
        return out

    def cancel(self) -> None:
        """Cancel the runs not yet collected (nothing once :meth:`result` has returned)."""
        if self._result is None:
            for ref in self.pending:
                ray.cancel(ref)

    def result(self) -> EvalResult:
        """Per-stage accuracy of every run (waits; a failed run or Ctrl-C cancels the rest)."""
        if self._result is not None:
            return self._result
        pending, runs = self.pending, self.runs
        order = {ref: r for r, ref in enumerate(pending)}
        results: dict[int, dict[str, list[float]]] = {}
        desc = f"evaluate {self.name} [{self.arch}]"
        bar = tqdm(total=runs, desc=desc, unit="run", disable=not self.progress, leave=False)
        t0 = time.perf_counter()
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    res = ray.get(ref)
                    results[order[ref]] = res
                    bar.set_postfix(test=f"{res['test'][-1] * 100:.1f}%" if "test" in res else "")
                    bar.update(1)
                    left = time_left(len(results), runs, time.perf_counter() - t0)
                    progress_log.info("%s: run %d/%d done%s", desc, len(results), runs, f", {left}" if left else "")
        except BaseException:  # a failed run or Ctrl-C: the other runs' results would go unread
            for ref in pending:
                ray.cancel(ref)
            raise
        finally:
            bar.close()
        scores = {s: np.array([results[r][s] for r in range(runs)], dtype=np.float64) for s in self.splits}
        self._result = EvalResult(name=self.name, arch=self.arch, scores=scores)
        if self.on_result is not None:
            self.on_result(self._result)
        return self._result


def submit_progressive(
    name: str,
    spec: ModelSpec,
    stages: list[StageSet],
    plan: EvalPlan,
    eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    resources: RunResources = RunResources(),
    progress: bool = True,
) -> PendingEval:
    """Submit ``plan.runs`` independent progressive runs as Ray tasks; returns without waiting."""
    gpus_per_run = resources.gpus
    eval_ref = ray.put(eval_sets)
    stages_ref = ray.put(stages)
    # "DEFAULT": run on the cluster's free resources even when called from inside a Tune trial
    # (whose placement group would otherwise capture these tasks and could never fit them)
    task = _progressive_task.options(num_cpus=resources.cpus, num_gpus=gpus_per_run, scheduling_strategy="DEFAULT")
    refs = [
        task.remote(spec, stages_ref, plan.recipe, eval_ref, derive_seed(plan.seed, "eval-run", r),
                    plan.carry_optimizer_state, gpus_per_run > 0)
        for r in range(plan.runs)
    ]
    return PendingEval(name, spec.arch, plan.runs, refs, list(eval_sets), progress)


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------


def random_subset(bundle: DatasetBundle, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` random real training images per class, class-major order."""
    g = generator(derive_seed(seed, "random-subset", ipc))
    xs, ys = [], []
    for c in range(bundle.num_classes):
        idx = torch.nonzero(bundle.train_y == c).flatten()
        if idx.numel() == 0:
            continue
        pick = idx[torch.randperm(idx.numel(), generator=g)[:ipc]]
        xs.append(bundle.train_x[pick])
        ys.append(bundle.train_y[pick])
    return torch.cat(xs), torch.cat(ys)


def eval_sets_of(bundle: DatasetBundle) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The splits every evaluation reports: validation (for choosing) and test (for reporting)."""
    return {"val": (bundle.val_x, bundle.val_y), "test": (bundle.test_x, bundle.test_y)}


def _submit_baseline(name: str, stage: StageSet, setup: BaselineSetup) -> PendingEval:
    """A one-stage evaluation with the evaluation config's recipe and resources, submitted.

    With ``setup.cache_dir``, the result is kept there under a digest of exactly what the
    evaluation consumes (see :func:`baseline_key`), so a re-run on the same data and recipe reuses it.
    """
    cfg, spec, seed = setup.cfg, setup.spec, setup.seed
    recipe = recipe_from_config(cfg, setup.augment)
    sets = eval_sets_of(setup.bundle)
    path = None
    if setup.cache_dir is not None:
        key = baseline_key(name, stage, recipe, spec, sets, cfg.runs, seed, setup.bundle.digest)
        path = Folder.at(setup.cache_dir) / f"{key}.json"
        cached = _read_cached(path)
        if cached is not None:
            progress_log.info("%s: reused from %s", name, path)
            return PendingEval.done(cached)
    pending = submit_progressive(name, spec, [stage], EvalPlan(recipe, cfg.runs, seed), sets, RunResources.of(cfg),
                                 progress=setup.progress)
    if path is not None:
        pending.on_result = lambda res: path.write_text(json.dumps({"format": 1, "result": res.to_dict()}))
    return pending


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def baseline_key(name: str, stage: StageSet, recipe: TrainRecipe, spec: ModelSpec,
                 eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]], runs: int, seed: int, dataset_digest: str) -> str:
    """Digest of what a baseline evaluation consumes: the training images and labels and the
    stage's lr/epochs/batch (as passed), the recipe object, the model, the evaluation splits,
    runs and seed. A change to any of them (a new budget rule included) is a new key."""
    d = {
        "name": name,
        "dataset": dataset_digest,
        "stage": {"images": _tensor_digest(stage.images), "labels": _tensor_digest(stage.labels), "lr": stage.lr,
                  "epochs": stage.epochs, "batch_size": stage.batch_size,
                  "soft_labels": _tensor_digest(stage.soft_labels) if stage.soft_labels is not None else None},
        "recipe": asdict(recipe),
        "model": spec.to_dict(),
        "eval_sets": {k: [_tensor_digest(x), _tensor_digest(y)] for k, (x, y) in sorted(eval_sets.items())},
        "runs": runs,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _read_cached(path: Folder) -> EvalResult | None:
    """A cached baseline, or None (absent or unreadable: it is then recomputed and rewritten)."""
    if not path.is_file():
        return None
    try:
        return EvalResult.from_dict(json.loads(path.read_text())["result"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluate_random_baseline(setup: BaselineSetup, ipc: int, epochs: int | None = None,
                             soft_labeller=None) -> EvalResult:
    """:func:`submit_random_baseline`, waited for."""
    return submit_random_baseline(setup, ipc, epochs, soft_labeller).result()


def submit_random_baseline(setup: BaselineSetup, ipc: int, epochs: int | None = None,
                           soft_labeller=None) -> PendingEval:
    """A fresh random real subset per run would mix two sources of variance; like the
    paper's random baseline we draw one subset per seed and train ``cfg.runs`` networks on it.

    ``epochs``: the one stage's length; pass :func:`budget_epochs` of the set it is compared
    with (equal training budget). Default: one stage of ``cfg.epochs_per_stage``.
    ``soft_labeller(x) -> logits`` (DATM's honest control): the same subset, trained with soft
    cross-entropy against an expert's logits instead of its class labels.
    """
    x, y = random_subset(setup.bundle, ipc, setup.seed)
    soft = soft_labeller(x) if soft_labeller is not None else None
    name = f"random ipc{ipc}" + (" soft labels" if soft is not None else "")
    stage = StageSet(x, y, lr=setup.cfg.lr, epochs=epochs, soft_labels=soft)
    return _submit_baseline(name, stage, setup)


# ----------------------------------------------------------------------------------------------
# Equal training budget: every row of a comparison table trains for the same number of epochs
# ----------------------------------------------------------------------------------------------


def budget_epochs(cfg: EvalConfig, num_stages: int) -> int:
    """Total evaluation epochs of a ``num_stages``-stage set: ``num_stages x epochs_per_stage``.

    A one-stage set compared with it (random subset, P = 1, a base method without PDD) trains
    this many epochs in its one stage, so a table never credits PDD with longer training.
    """
    return num_stages * cfg.epochs_per_stage


def epochs_per_stage_for(total_epochs: int, num_stages: int) -> int:
    """``evaluation.epochs_per_stage`` that gives a ``num_stages``-stage set ``total_epochs`` in total.

    Used by tables with rows of different P (``benchmarks/quality.py --eval-epochs``); a total
    the stage count does not divide is refused rather than rounded (rows would differ).
    """
    if total_epochs < num_stages or total_epochs % num_stages:
        raise PddError(f"training budget {total_epochs} epochs is not divisible into {num_stages} stages; "
                       f"use a multiple of {num_stages}")
    return total_epochs // num_stages


def evaluate_full_baseline(setup: BaselineSetup) -> EvalResult:
    """The whole training set, ``cfg.full_epochs`` epochs of minibatch SGD: the ceiling."""
    return submit_full_baseline(setup).result()


def submit_full_baseline(setup: BaselineSetup) -> PendingEval:
    """:func:`evaluate_full_baseline`, submitted; ``.result()`` waits."""
    b, cfg = setup.bundle, setup.cfg
    stage = StageSet(b.train_x, b.train_y, lr=cfg.lr, epochs=cfg.full_epochs, batch_size=cfg.full_batch_size)
    return _submit_baseline("full data", stage, setup)


def format_table(rows: list[tuple[str, str, float, float]], title: str = "test accuracy") -> str:
    """A small aligned table: (method, detail, mean %, std %) per row."""
    header = ("method", "setting", title)
    body = [(m, d, f"{mu:5.2f} ± {sd:4.2f}") for m, d, mu, sd in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(3)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), "-+-".join("-" * w for w in widths)]
    out += [fmt.format(*r) for r in body]
    return "\n".join(out)

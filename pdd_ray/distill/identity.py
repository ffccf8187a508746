"""A run's identity: the settings its cached results consume, their digest and its directory.

Every setting that reaches a stage worker, the conditioning networks or a transition is built here by
the same function that hands it to its consumer, so the run key (``runs/<name>-<key>``)
changes exactly when a consumed setting does (``tests/distill/test_run_key.py``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

from pdd_ray.config import PddConfig
from pdd_ray.distill.methods import method_class, method_image_lr, method_settings
from pdd_ray.evaluation import recipe_from_config
from pdd_ray.experts.produce import expert_recipe, kept_epochs, matching_reach
from pdd_ray.experts.store import store_key
from pdd_ray.locks import file_lock
from pdd_ray.prepare import data_settings
from pdd_ray.seeding import derive_seed
from pdd_ray.storage import Folder
from pdd_ray.training import TrainRecipe


def selection_recipe(cfg: PddConfig) -> TrainRecipe:
    """The recipe of the in-loop validation networks (selection of the stage's best iterate).

    The evaluation section's optimiser settings with ``distill.eval_epochs``; its lr is not
    used (each validation trains with the stage's α, see ``stage.validate``), so it is pinned
    here and a change of ``evaluation.lr`` cannot reach the run key.
    """
    return replace(recipe_from_config(cfg.evaluation, cfg.augment.strategy), epochs=cfg.distill.eval_epochs, lr=0.0)


def warmup_recipe(cfg: PddConfig, alpha: float) -> TrainRecipe:
    """A transition expert's warm-up on the synthetic union S_<=k (lr α_k, evaluation's optimiser)."""
    d, ev = cfg.distill, cfg.evaluation
    return TrainRecipe(epochs=d.transition_syn_epochs, lr=alpha, momentum=ev.momentum, weight_decay=ev.weight_decay,
                       batch_size=ev.batch_size, lr_decay_at_half=True, augment=cfg.augment.strategy)


def transition_real_recipe(cfg: PddConfig) -> TrainRecipe:
    """A transition expert's real-data phase: the experts' recipe for the epochs matching reaches
    (none for methods without trajectories: they only need the conditioned networks)."""
    reach = matching_reach(cfg) if method_class(cfg.distill.method).needs_trajectories else -1
    return replace(expert_recipe(cfg), epochs=reach + 1)


def stage_settings(cfg: PddConfig, k: int) -> dict:
    """What stage k's workers consume besides their conditioning networks and the frozen stages
    (both keyed by their own settings): the same values ``run_stage`` puts into the ``StageTask``."""
    d = cfg.distill
    return {
        "method": d.method,
        # per class: the class count is fixed by the data settings, which are part of the run key
        "params": method_settings(cfg, 1, k),
        "init": {"ipc": d.ipc_per_stage, "seed": derive_seed(cfg.seed, "stage-init", k)},
        "iterations": d.iterations,
        "lr_img": method_image_lr(cfg),
        "lr_lr": d.lr_lr,
        "lr_init": d.lr_init,
        "eval_every": d.eval_every,
        "eval_runs": d.eval_runs,
        "selection": asdict(selection_recipe(cfg)),
        "augment": cfg.augment.strategy,
        "workers": {"num_workers": d.num_workers, "threads": d.cpus_per_worker, "use_gpu": d.use_gpu,
                    "deterministic": d.deterministic,
                    # only when set: runs from before the setting existed keep their keys
                    **({"trajectories_per_worker": d.trajectories_per_worker} if d.trajectories_per_worker != 1 else {})},
    }


def conditioning_settings(cfg: PddConfig) -> dict:
    """What the stages' conditioning networks consume: stage-1 experts (when the method matches
    trajectories or discarding needs their forgetting counts), the transitions, the discard."""
    d = cfg.distill
    method = method_class(d.method)
    out: dict = {}
    if method.needs_trajectories or d.discard_fraction > 0:
        out["stage1_experts"] = {"recipe": asdict(expert_recipe(cfg)), "keep_epochs": kept_epochs(cfg),
                                 "num_experts": cfg.experts.num_experts}
    if d.num_stages > 1:
        out["transition"] = {"warmup": asdict(warmup_recipe(cfg, alpha=0.0)),  # α_k: from the stage itself
                             "real": asdict(transition_real_recipe(cfg)),
                             "num_experts": cfg.experts.num_experts, "transition_experts": d.transition_experts}
    if d.discard_fraction > 0:
        out["discard"] = {"fraction": d.discard_fraction, "from_stage": d.discard_from_stage,
                          "min_per_class": d.discard_min_per_class}
    return out


def run_settings(cfg: PddConfig) -> dict:
    """The settings objects a run's cached results (finished stages, Train checkpoints,
    transition experts) consume, built by the same functions that hand them to their consumers.

    Nothing is dropped by name: what is not built here (tracking, storage, name, ``max_failures``,
    ``checkpoint_every``, the evaluation settings used only after distillation, another
    method's section) cannot change the key; what is (``evaluation.weight_decay`` via the
    in-loop selection recipe and the transition warm-up, ...) always does.
    """
    return {
        "data": data_settings(cfg),  # what prepare() loads: dataset, split, ZCA, image size
        "model": cfg.model.model_dump(mode="json"),
        "seed": cfg.seed,
        "num_stages": cfg.distill.num_stages,
        "stages": [stage_settings(cfg, k) for k in range(1, cfg.distill.num_stages + 1)],
        "conditioning": conditioning_settings(cfg),
    }


def run_key(cfg: PddConfig) -> str:
    """Digest of :func:`run_settings`: the run directory's key."""
    return store_key(run_settings(cfg))


def run_dir(cfg: PddConfig) -> Folder:
    """``<storage>/runs/<name>-<key>``: the same config finds its run again (a local or NFS
    folder, or an object-store prefix such as ``s3://bucket/x/runs/digits-<key>``)."""
    return Folder.at(cfg.storage_root) / "runs" / f"{cfg.name}-{run_key(cfg)}"


def run_lock(cfg: PddConfig):
    """Exclusive lock on ``cfg``'s run directory (a context manager; see :mod:`pdd_ray.locks`).

    Two runs of the same config in one storage would otherwise train the same stages twice and
    rewrite each other's artifact; with it the second waits, then finds every stage finished.
    The lock file sits beside the run directory, so deleting the directory cannot split it.
    Object stores cannot lock (as for the trajectory store): there two runs of one config both
    train, both write complete records, and the last write wins.
    """
    directory = run_dir(cfg)
    if not directory.local:
        return nullcontext()
    return file_lock(Path(directory.parent) / f".{directory.name}.lock", f"run directory {directory}")

"""``pdd-ray sweep``: layouts (grid / fixed_total_ipc), search entries, and ASHA stopping."""

from __future__ import annotations

import pytest
import yaml

from pdd_ray.config import load_config
from pdd_ray.errors import PddError
from pdd_ray.sweep import _space_entry, load_sweep, param_space, trial_overrides


def _write(tmp_path, **spec) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "digits", "storage": str(tmp_path), **spec}))
    return str(path)


def test_fixed_total_ipc_pairs_each_stage_count_with_total_over_p(tmp_path):
    sweep = load_sweep(_write(tmp_path, mode="fixed_total_ipc", total_ipc=4, num_stages=[1, 2, 4],
                              ipc_per_stage=[7]))  # ipc_per_stage is ignored in this mode
    layouts = param_space(sweep)["layout"]["grid_search"]
    assert layouts == [[1, 4], [2, 2], [4, 1]]
    for p, ipc in layouts:
        cfg = load_config(sweep.base, trial_overrides(sweep, {"layout": [p, ipc]}))
        assert (cfg.distill.num_stages, cfg.distill.ipc_per_stage, cfg.distill.total_ipc) == (p, ipc, 4)
    # grid mode: the full product
    grid = load_sweep(_write(tmp_path, num_stages=[1, 2], ipc_per_stage=[3, 5]))
    assert param_space(grid)["layout"]["grid_search"] == [[1, 3], [1, 5], [2, 3], [2, 5]]


def test_budget_epochs_gives_every_layout_the_same_training_budget(tmp_path):
    sweep = load_sweep(_write(tmp_path, mode="fixed_total_ipc", total_ipc=4, num_stages=[1, 2, 4], budget_epochs=400))
    for p, ipc in param_space(sweep)["layout"]["grid_search"]:
        cfg = load_config(sweep.base, trial_overrides(sweep, {"layout": [p, ipc]}))
        assert cfg.evaluation.epochs_per_stage * p == 400
    with pytest.raises(PddError, match="budget_epochs"):
        load_sweep(_write(tmp_path, num_stages=[1, 3], budget_epochs=400))


def test_fixed_total_ipc_errors_are_one_line(tmp_path):
    with pytest.raises(PddError) as err:
        load_sweep(_write(tmp_path, mode="fixed_total_ipc", total_ipc=10, num_stages=[1, 3, 4]))
    assert "\n" not in str(err.value) and "[3, 4]" in str(err.value) and "10" in str(err.value)
    with pytest.raises(PddError, match="needs total_ipc"):
        load_sweep(_write(tmp_path, mode="fixed_total_ipc", num_stages=[1, 2]))


def test_search_entries_become_tune_domains_and_trial_overrides(tmp_path):
    from ray.tune.search.sample import Categorical, Float

    sweep = load_sweep(_write(tmp_path, search={"distill.lr_img": {"loguniform": [30, 300]},
                                                "distill.lr_lr": {"uniform": [1e-6, 1e-5]},
                                                "distill.syn_steps": [2, 3],
                                                "distill.unroll": {"choice": ["full", "checkpoint"]}}))
    space = param_space(sweep)
    lr_img = space["distill.lr_img"]
    assert isinstance(lr_img, Float) and (lr_img.lower, lr_img.upper) == (30, 300)
    assert type(lr_img.get_sampler()).__name__.lstrip("_") == "LogUniform"
    assert type(space["distill.lr_lr"].get_sampler()).__name__.lstrip("_") == "Uniform"
    assert space["distill.syn_steps"] == {"grid_search": [2, 3]}
    assert isinstance(space["distill.unroll"], Categorical) and space["distill.unroll"].categories == ["full", "checkpoint"]
    samples = [lr_img.sample() for _ in range(200)]
    assert all(30 <= s <= 300 for s in samples)
    assert sum(s < 95 for s in samples) > 60  # log-uniform: half the mass below sqrt(30*300) ~ 95
    # a sampled point reaches the trial's config
    cfg = load_config(sweep.base, trial_overrides(sweep, {"layout": [2, 3], "distill.lr_img": 123.5,
                                                          "distill.unroll": "checkpoint"}))
    assert cfg.distill.lr_img == 123.5 and cfg.distill.unroll == "checkpoint" and cfg.distill.num_stages == 2
    with pytest.raises(PddError, match="search entry"):
        _space_entry({"normal": [0, 1]})


@pytest.fixture(scope="module")
def asha(ray_session, tmp_path_factory, tiny_overrides):
    """Two 2-stage trials run one after the other; the second has a step size so small its
    validation networks cannot learn (α ~ 1e-9), so ASHA must stop it after stage 1."""
    from pdd_ray.sweep import run_sweep

    root = tmp_path_factory.mktemp("asha")
    spec = {
        "name": "asha-sweep",
        "base": "digits",
        "storage": str(root),
        # validation networks long enough to tell layouts apart (at 5 epochs every trial sits at chance and ties)
        "overrides": [o for o in tiny_overrides(str(root)) if not o.startswith(("storage", "name"))] + ["distill.eval_epochs=50"],
        "num_stages": [2],
        "ipc_per_stage": [1],
        "search": {"distill.lr_init": [0.01, 1.0e-9]},
        "scheduler": "asha",
        "reduction_factor": 2,
        "max_concurrent_trials": 1,
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return root, run_sweep(load_sweep(str(path)), progress=False)


def test_asha_stops_the_trial_behind_after_stage_1(asha):
    root, rows = asha
    by_lr = {r["distill.lr_init"]: r for r in rows}
    assert set(by_lr) == {0.01, 1e-9}
    good, bad = by_lr[0.01], by_lr[1e-9]
    assert good["stages_done"] == 2 and good["test_acc"] is not None  # ran to the end
    assert bad["stages_done"] == 1 and bad["test_acc"] is None  # stopped at the rung after stage 1
    assert bad["val_acc"] < good["val_acc"]
    # the best config is the trial with the highest validation accuracy
    best = load_config(str(root / "best_config.yaml"))
    assert best.distill.lr_init == 0.01

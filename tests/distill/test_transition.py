"""PDD's transition (transition.transition_jobs + produce): expert j of stage k+1 starts from expert
j's initial weights, trains on S_<=k with α_k, then records real-data epochs with a fresh
optimiser -- M + E + 1 epochs, i.e. M + E + 2 stored rows (row 0 = after the warm-up)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pdd_ray.config import load_config
from pdd_ray.distill.transition import transition_jobs
from pdd_ray.evaluation import StageSet, random_subset
from pdd_ray.experts.produce import expert_recipe, expert_store_root, produce, stage1_experts
from pdd_ray.experts.store import TrajectoryStore
from pdd_ray.experts.trajectory import load_start_params
from pdd_ray.models import FlatModel
from pdd_ray.modelspec import build_seeded
from pdd_ray.prepare import prepare
from pdd_ray.seeding import derive_seed, generator
from pdd_ray.training import TrainRecipe, train


ALPHA_K = 0.03  # the stage's learned lr: distinct from lr_init (0.01) and evaluation.lr (0.01)


@pytest.fixture(scope="module")
def transition(ray_session, tmp_path_factory, tiny_overrides):
    out = tmp_path_factory.mktemp("transition")
    cfg = load_config("digits", tiny_overrides(str(out)) + ["evaluation.momentum=0.5", "evaluation.weight_decay=0.001",
                                                             "evaluation.batch_size=8"])
    prepared = prepare(cfg)
    key, _ = stage1_experts(cfg, prepared, progress=False)
    union = [StageSet(*random_subset(prepared.bundle, 1, 123), lr=ALPHA_K)]
    jobs = transition_jobs(cfg, prepared, 1, key, union)
    store = TrajectoryStore(expert_store_root(cfg))
    produce(store, jobs[:1], prepared, progress=False)
    return cfg, prepared, key, union, jobs, store


def _model_at(prepared, flat: torch.Tensor):
    model = build_seeded(prepared.spec, 0)
    FlatModel(model).load_flat(flat)
    return model


def test_transition_records_m_plus_e_plus_2_rows_from_the_warm_start(transition):
    cfg, prepared, key, union, jobs, store = transition
    d, ev = cfg.distill, cfg.evaluation
    job = jobs[0]
    assert len(jobs) == cfg.experts.num_experts and job.init_from == (key, 0)
    with store.open(job.key, 0) as r:
        assert r.epochs == list(range(d.max_start_epoch + d.expert_epochs + 2))
        row0, row1 = load_start_params(r.params(0)), load_start_params(r.params(1))
    with store.open(key, 0) as r:
        init = load_start_params(r.params(0))  # expert 0's initial weights at stage 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the expert workers train with experts.cpus = 1 thread
    try:
        # row 0: expert 0's init trained on S_<=1 with α_1, the evaluation's optimiser settings
        model = _model_at(prepared, init)
        g = generator(derive_seed(job.seed, "data"))
        warm = TrainRecipe(epochs=d.transition_syn_epochs, lr=ALPHA_K, momentum=ev.momentum,
                           weight_decay=ev.weight_decay, batch_size=ev.batch_size, lr_decay_at_half=True,
                           augment=cfg.augment.strategy)
        ux, uy = union[0].images, union[0].labels
        warm_opt = train(model, ux, uy, warm, g)
        torch.testing.assert_close(FlatModel(model).flatten(), row0, rtol=0, atol=1e-6)
        assert not torch.allclose(row0, init)  # the warm-up really trained

        # row 1: one real-data epoch from row 0 with a FRESH optimiser (the experts' recipe)
        b = prepared.bundle
        real = replace(expert_recipe(cfg), epochs=1)
        state = g.get_state()
        fresh = _model_at(prepared, row0)
        train(fresh, b.train_x, b.train_y, real, g)
        torch.testing.assert_close(FlatModel(fresh).flatten(), row1, rtol=0, atol=1e-5)
        # the bug this guards: carrying the warm-up's optimiser (its momentum 0.5, weight decay and
        # buffers) into the real phase gives another row 1
        g.set_state(state)
        carried = _model_at(prepared, row0)
        opt = torch.optim.SGD(carried.parameters(), lr=warm.lr, momentum=warm.momentum, weight_decay=warm.weight_decay)
        opt.load_state_dict(warm_opt.state_dict())
        train(carried, b.train_x, b.train_y, real, g, optimizer=opt)
        assert not torch.allclose(FlatModel(carried).flatten(), row1, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_transition_key_follows_its_inputs(transition):
    cfg, prepared, key, union, jobs, _ = transition
    other_alpha = transition_jobs(cfg, prepared, 1, key, [replace(union[0], lr=0.02)])
    assert other_alpha[0].key != jobs[0].key
    assert transition_jobs(cfg, prepared, 1, key, union)[0].key == jobs[0].key


def test_the_union_goes_through_the_object_store_once_per_transition(transition, monkeypatch):
    """Every job of a transition warms up on the same union; at Tiny ImageNet IPC 50 that is
    ~393 MB, so it must be put once and shared by reference, not serialised into each of 100
    jobs (issue 12). A fresh union (a new transition key, so both jobs run): it is put exactly
    once and both experts are stored."""
    import ray

    from pdd_ray.experts.trajectory import Warmup

    cfg, prepared, key, union, jobs, store = transition
    other = [StageSet(*random_subset(prepared.bundle, 1, 456), lr=ALPHA_K)]
    fresh = transition_jobs(cfg, prepared, 1, key, other)
    assert len(fresh) == 2 and fresh[0].key != jobs[0].key
    put: list[object] = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: put.append(value) or real_put(value, **kw))
    produce(store, fresh, prepared, progress=False)
    assert sum(isinstance(v, Warmup) for v in put) == 1
    d = cfg.distill
    for job in fresh:
        with store.open(job.key, job.index) as r:
            assert r.epochs == list(range(d.max_start_epoch + d.expert_epochs + 2))

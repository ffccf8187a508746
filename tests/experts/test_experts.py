"""Expert trajectories on Ray actors: parallel == serial, resume, mismatch errors, URIs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pdd_ray.config import load_config
from pdd_ray.errors import PddError
from pdd_ray.experts.produce import expert_store_root, pool_size, produce, stage1_experts, stage1_jobs
from pdd_ray.experts.store import TrajectoryStore
from pdd_ray.experts.trajectory import RealSplits, record_trajectory
from pdd_ray.prepare import prepare


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_overrides):
    out = tmp_path_factory.mktemp("experts")
    cfg = load_config("digits", tiny_overrides(str(out)) + ["experts.num_experts=3"])
    return cfg, prepare(cfg)


def test_parallel_equals_serial_and_resume_trains_only_missing(ray_session, setup):
    cfg, prepared = setup
    key, summaries = stage1_experts(cfg, prepared, progress=False)
    assert [s["index"] for s in summaries] == [0, 1, 2]
    store = TrajectoryStore(expert_store_root(cfg))
    assert store.indices(key) == [0, 1, 2]

    # serial, in this process, from the same jobs: bit-identical trajectories (at the same
    # per-expert thread count as the actors: experts.cpus = 1)
    b = prepared.bundle
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for job in stage1_jobs(cfg, prepared):
        serial = record_trajectory(prepared.spec, RealSplits(b.train_x, b.train_y, b.val_x, b.val_y), job.recipe,
                                   job.seed, job.keep_epochs)
        with store.open(key, job.index) as reader:
            assert reader.num_rows == cfg.distill.max_start_epoch + cfg.distill.expert_epochs + 1
            stored = np.stack([reader.params(r) for r in range(reader.num_rows)])
            assert reader.meta["dataset_digest"] == b.digest
            assert len(reader.meta["val_acc"]) == reader.num_rows
        assert np.array_equal(stored.view(np.uint32), serial.params.view(np.uint32))
    torch.set_num_threads(threads)

    # experts differ from each other (independent seeds)
    with store.open(key, 0) as r0, store.open(key, 1) as r1:
        assert not np.array_equal(r0.params(0), r1.params(0))

    # resume: delete one expert; a re-run trains exactly that one and leaves the others untouched
    mtime = os.path.getmtime(store.path(key, 0))
    os.remove(store.path(key, 1))
    key2, again = stage1_experts(cfg, prepared, progress=False)
    assert key2 == key and [s["index"] for s in again] == [1]
    assert os.path.getmtime(store.path(key, 0)) == mtime
    # nothing missing: nothing trained
    assert stage1_experts(cfg, prepared, progress=False)[1] == []


def test_experts_learn(ray_session, setup):
    cfg, prepared = setup
    key, _ = stage1_experts(cfg, prepared, progress=False)
    with TrajectoryStore(expert_store_root(cfg)).open(key, 0) as reader:
        acc = reader.meta["val_acc"]
    assert acc[-1] > acc[0] + 0.2, acc  # from chance (~10%) to clearly better


def test_mismatched_file_is_a_one_line_error(ray_session, setup):
    cfg, prepared = setup
    key, _ = stage1_experts(cfg, prepared, progress=False)
    store = TrajectoryStore(expert_store_root(cfg))
    jobs = stage1_jobs(cfg, prepared)
    # a file whose metadata says another seed sits under the expected name
    with store.open(key, 2) as reader:
        params = np.stack([reader.params(r) for r in range(reader.num_rows)])
        meta = dict(reader.meta, seed=12345)
    store.write(key, 2, params, meta)
    with pytest.raises(PddError) as info:
        produce(store, jobs, prepared, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "seed" in msg and store.path(key, 2) in msg


def test_file_uri_store(ray_session, tmp_path, tiny_overrides):
    cfg = load_config("digits", tiny_overrides(str(tmp_path)) + [f"experts.storage=file://{tmp_path}/uri-store",
                                                                  "experts.num_experts=1"])
    prepared = prepare(cfg)
    key, summaries = stage1_experts(cfg, prepared, progress=False)
    assert len(summaries) == 1
    assert os.path.isfile(f"{tmp_path}/uri-store/{key}/expert_00000.arrow")


def test_cli_experts_logs_to_mlflow_and_second_call_trains_nothing(ray_session, tmp_path, capsys, tiny_overrides):
    from mlflow import MlflowClient

    from pdd_ray.cli import main

    ov = [o for o in tiny_overrides(str(tmp_path)) if not o.startswith("tracking")] + ["--no-progress"]
    assert main(["experts", "digits", *ov]) == 0
    assert "trained 2 experts" in capsys.readouterr().out
    assert main(["experts", "digits", *ov]) == 0
    assert "already present; nothing to train" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("pdd_ray").experiment_id],
                              order_by=["attributes.start_time ASC"])
    first = runs[0]
    assert first.data.tags["pdd.kind"] == "experts" and len(first.data.tags["pdd.experts_key"]) == 16
    history = client.get_metric_history(first.info.run_id, "expert_final_val_acc")
    assert sorted(m.step for m in history) == [0, 1]


def test_pool_size_waits_for_resources_released_just_before(ray_session):
    """Right after an actor dies its CPU is released asynchronously; the pool must still get
    both CPUs of the session cluster (it once read 0 free and ran every transition on one)."""
    import ray

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self) -> int:
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    ray.kill(hog)
    assert pool_size(5, cpus=1.0, gpus=0.0) == 2
    assert pool_size(1, cpus=1.0, gpus=0.0) == 1
    with pytest.raises(PddError, match="experts.gpus = 0.5"):
        pool_size(2, cpus=1.0, gpus=0.5)

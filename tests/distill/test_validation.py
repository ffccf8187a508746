"""In-loop validation shared out over the stage's workers (issue 12): every rank trains its
share of the ``eval_runs`` networks and all ranks get the same mean, equal to one worker's."""

from __future__ import annotations

import json

import torch

from pdd_ray.distill.stage import shared_mean
from pdd_ray.evaluation import StageSet, progressive_run
from pdd_ray.modelspec import ModelSpec
from pdd_ray.training import TrainRecipe

RUNS = 3


def _score(r: int) -> float:
    """One real validation run: a tiny ConvNet trained from run r's seed, its val accuracy."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 4
    spec = ModelSpec("convnet", 1, 4, 8, width=8, depth=2)
    scores = progressive_run(spec, [StageSet(x[:24], y[:24], lr=0.05)], TrainRecipe(epochs=3, lr=0.05, batch_size=8),
                             {"val": (x[24:], y[24:])}, seed=100 + r)
    return scores["val"][-1]


def _validate_in_group(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        scored: list[int] = []
        mean = shared_mean(RUNS, lambda r: scored.append(r) or _score(r), torch.device("cpu"))
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"mean": mean, "scored": scored}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_validation_runs_and_agree_with_one_worker(tmp_path):
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    alone: list[int] = []
    one_worker = shared_mean(RUNS, lambda r: alone.append(r) or _score(r), torch.device("cpu"))
    assert alone == [0, 1, 2]
    assert len({_score(r) for r in range(RUNS)}) > 1  # the runs differ, so a wrong split shows

    out = str(tmp_path / "val")
    mp.start_processes(_validate_in_group, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True,
                       start_method="spawn")
    got = [json.loads(open(f"{out}.{rank}").read()) for rank in range(2)]
    assert got[0]["scored"] == [0, 2] and got[1]["scored"] == [1]  # both ranks train networks
    assert got[0]["mean"] == got[1]["mean"] == one_worker  # bit for bit: each run's seed is its own


def test_a_workers_share_trains_side_by_side_on_its_threads_with_the_same_scores():
    """Two threads: both runs are in flight at once (the barrier needs both), one intra-op
    thread each, and the mean is bit for bit the one of one run after another."""
    import threading

    torch.set_num_threads(1)
    one_after_another = shared_mean(RUNS, _score, torch.device("cpu"))
    both_in_flight = threading.Barrier(2, timeout=60)
    seen: list[tuple[int, str, int]] = []

    def score(r: int) -> float:
        if r < 2:
            both_in_flight.wait()  # BrokenBarrierError after 60 s if runs 0 and 1 go one after another
        seen.append((r, threading.current_thread().name, torch.get_num_threads()))
        return _score(r)

    torch.set_num_threads(2)
    try:
        side_by_side = shared_mean(RUNS, score, torch.device("cpu"), threads=2)
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(1)
    assert sorted(r for r, _, _ in seen) == [0, 1, 2]
    assert len({name for _, name, _ in seen}) == 2 and all(n == 1 for _, _, n in seen)
    assert side_by_side == one_after_another


def test_networks_built_in_threads_get_their_seeds_weights():
    """build_seeded draws from torch's global generator under a lock: threads building at once
    (in-loop validation side by side) get exactly the weights of building one after another."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pdd_ray.modelspec import build_seeded

    spec = ModelSpec("convnet", 3, 10, 16, width=32, depth=2)
    seeds = list(range(32))
    expected = [torch.cat([p.flatten() for p in build_seeded(spec, s).parameters()]) for s in seeds]
    start = threading.Barrier(8, timeout=60)

    def build(seed: int) -> torch.Tensor:
        if seed < 8:
            start.wait()
        return torch.cat([p.flatten() for p in build_seeded(spec, seed).parameters()])

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(build, seeds))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))

"""The stage's Ray Train launch: resources per worker and the collectives' timeout come from the
config (issue 12: fractional GPUs, and a process-group timeout that outlasts a validation round)."""

from __future__ import annotations

import pytest

from pdd_ray.config import load_config
from pdd_ray.distill import launch
from pdd_ray.errors import PddError


def test_trainer_takes_the_gpu_share_and_the_collective_timeout(tmp_path):
    cfg = load_config("digits", ["distill.use_gpu=true", "distill.gpus_per_worker=0.5", "distill.num_workers=2",
                                 "distill.cpus_per_worker=1", "distill.collective_timeout_s=900"])
    trainer = launch._trainer(cfg, tmp_path, 1, None)
    assert trainer.scaling_config.num_workers == 2 and trainer.scaling_config.use_gpu
    assert trainer.scaling_config.resources_per_worker == {"CPU": 1, "GPU": 0.5}
    assert trainer.backend_config.timeout_s == 900


def test_cpu_workers_ask_for_no_gpu_and_the_default_timeout_outlasts_torchs(tmp_path):
    cfg = load_config("digits", ["distill.num_workers=2", "distill.cpus_per_worker=1"])
    trainer = launch._trainer(cfg, tmp_path, 1, None)
    assert trainer.scaling_config.resources_per_worker == {"CPU": 1}
    assert trainer.backend_config.timeout_s > 1800  # torch's default would cut a long validation round


def test_a_single_worker_stage_gets_no_torch_process_group(tmp_path):
    """One worker has nobody to all-reduce with: no TorchConfig, so the controller does not
    import torch and the worker joins no gloo group (about 6 s per stage here)."""
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = load_config("digits")
    assert cfg.distill.num_workers == 1
    trainer = launch._trainer(cfg, tmp_path, 1, None)
    assert not isinstance(trainer, TorchTrainer)
    assert not isinstance(trainer.backend_config, TorchConfig)
    assert trainer.scaling_config.resources_per_worker == {"CPU": cfg.distill.cpus_per_worker}


def test_gpu_share_without_gpus_is_a_one_line_error():
    with pytest.raises(PddError, match=r"distill.gpus_per_worker = 0.5 needs distill.use_gpu: true"):
        load_config("digits", ["distill.gpus_per_worker=0.5"])


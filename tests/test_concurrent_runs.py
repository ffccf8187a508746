"""Two `pdd-ray run` of one config in one storage, started at once, tracking on (issue 17, item 1).

Both must finish, the experts and stages must be trained once (the second run waits for the
first's lock, then reuses its work), and the MLflow store must stay usable. The work is
counted through MLflow: a run logs ``expert_final_val_acc`` only for experts it trained, and a
stage run has ``grad_norm`` only when its stage was optimised live (a stage read back from its
record logs its losses and validation history, never a gradient norm).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_two_runs_at_once_share_one_copy_of_the_work(tmp_path, tiny_overrides):
    storage = tmp_path / "s"
    overrides = [o for o in tiny_overrides(str(storage)) if not o.startswith("tracking.")]
    overrides += ["tracking.enabled=true", "evaluation.runs=1"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "pdd_ray", "run", "digits", *overrides, "--no-progress"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=1500) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "PDD stage 2" in out
    assert any("waiting for run directory" in err for _, err in outs)  # the second one really waited

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")  # still usable
    exp = client.get_experiment_by_name("pdd_ray")
    runs = client.search_runs([exp.experiment_id])
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    stage_runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(top) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len(stage_runs) == 4  # 2 stages per run
    trained_experts = sum(len(client.get_metric_history(r.info.run_id, "expert_final_val_acc")) for r in top)
    assert trained_experts == 2  # experts.num_experts, trained once in all
    live_stages = [r for r in stage_runs if "grad_norm" in r.data.metrics]
    assert sorted(r.data.tags["pdd.stage"] for r in live_stages) == ["1", "2"]  # each stage optimised once

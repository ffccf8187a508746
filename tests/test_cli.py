"""The command line: help, the baseline table, and one-line errors with exit status 2."""

from __future__ import annotations

import pytest

from pdd_ray.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("evaluate", "experts", "run", "sweep", "ui"):
        assert cmd in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_evaluate_random_baseline_prints_table(ray_session, capsys, tmp_path):
    code = main(["evaluate", "--baseline", "random", "--ipc", "2", "--runs", "2", "--no-progress",
                 "model.width=16", "evaluation.epochs_per_stage=30", "--json", str(tmp_path / "r.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "random ipc2" in out and "ipc 2, 2 runs" in out and "±" in out
    assert (tmp_path / "r.json").is_file()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["run", "distill.ipc_per_stage=0"], "distill.ipc_per_stage"),
        (["run", "distill.ipc_per_stagee=1"], "did you mean 'distill.ipc_per_stage'"),
        (["run", "model.depth=6"], "too deep for 8x8"),
        (["experts", "no_such_preset"], "neither a YAML file nor a preset"),
        (["evaluate", "--baseline", "full", "--dataset", "cifar10", "--root", "/nonexistent/data"],
         "cifar-10-batches-bin"),
        (["evaluate", "--baseline", "random"], "--ipc"),
        (["evaluate"], "nothing to evaluate"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pdd-ray: error: ") and "\n" not in err
    assert fragment in err, err


def test_image_size_the_model_cannot_take(tmp_path, capsys):
    from fakes import write_fake_imagefolder

    write_fake_imagefolder(tmp_path, classes=2, per_class=2, size=16)
    assert main(["experts", "data.dataset=imagefolder", f"data.root={tmp_path}", "model.depth=5",
                 f"storage={tmp_path}/out"]) == 2
    err = capsys.readouterr().err.strip()
    assert "depth" in err and "16" in err and "\n" not in err


# ---------------------------------------------------------------------------- issue 17, item 5


@pytest.fixture
def captured_run(monkeypatch):
    """`pdd-ray run` up to the loaded config: the pipeline is replaced by a recorder."""
    import pdd_ray.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda cfg, progress=True, **kw: seen.update(cfg=cfg, progress=progress))
    monkeypatch.setattr(pipeline, "print_report", lambda cfg, report: None)
    return seen


def test_overrides_are_accepted_anywhere_among_the_options(captured_run, tmp_path):
    assert main(["run", "digits", "seed=3", "--no-progress", f"storage={tmp_path}/x", "distill.ipc_per_stage=4"]) == 0
    cfg = captured_run["cfg"]
    assert (cfg.seed, cfg.storage, cfg.distill.ipc_per_stage) == (3, f"{tmp_path}/x", 4)
    assert captured_run["progress"] is False
    # the config name may also come after an override, or after the options
    assert main(["run", "--no-progress", "seed=5", "digits", "name=late"]) == 0
    assert (captured_run["cfg"].seed, captured_run["cfg"].name) == (5, "late")


def test_words_that_are_not_overrides_are_still_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "digits", "--no-progress", "--bogus"])
    assert info.value.code == 2 and "--bogus" in capsys.readouterr().err
    assert main(["run", "digits", "seed=1", "--no-progress", "cifar10_ipc10"]) == 2
    assert "two configs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["ui", "--no-progress", "/nonexistent/storage"], "no MLflow store"),
        (["submit", "distill.ipc_per_stage=0", "--no-progress", "--address", "http://127.0.0.1:9"],
         "distill.ipc_per_stage"),
        (["jobs", "status", "raysubmit_x", "--no-progress", "--address", "http://127.0.0.1:9"], "127.0.0.1:9"),
    ],
)
def test_every_command_takes_no_progress(argv, fragment, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err
    assert code == 2 and fragment in err, err


def test_a_command_ends_the_ray_it_started_but_not_a_callers(ray_session, capsys):
    """`pdd-ray ...` shuts down the Ray instance it started when the command ends (not in
    atexit, after the interpreter has begun tearing down); one the caller had running stays."""
    import subprocess
    import sys

    import ray

    assert main(["evaluate", "--baseline", "random", "--ipc", "1", "--runs", "1", "--no-progress",
                 "model.width=8", "evaluation.epochs_per_stage=1"]) == 0
    assert ray.is_initialized()  # the test session's instance was left running
    code = ("import ray; from pdd_ray.cli import main; "
            "rc = main(['evaluate', '--baseline', 'random', '--ipc', '1', '--runs', '1', '--no-progress', "
            "'model.width=8', 'evaluation.epochs_per_stage=1']); print('RC', rc, 'UP', ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "RC 0 UP False" in out.stdout, out.stdout + out.stderr

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
    import sys

    sys.path.insert(0, "tests")
    from fakes import write_fake_imagefolder

    write_fake_imagefolder(tmp_path, classes=2, per_class=2, size=16)
    assert main(["experts", "data.dataset=imagefolder", f"data.root={tmp_path}", "model.depth=5",
                 f"storage={tmp_path}/out"]) == 2
    err = capsys.readouterr().err.strip()
    assert "depth" in err and "16" in err and "\n" not in err

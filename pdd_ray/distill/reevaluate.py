"""``pdd-ray evaluate ARTIFACT``: re-run an artifact's recorded recipe, on any architecture."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pdd_ray.atomic import write_text_atomic
from pdd_ray.config import build_config
from pdd_ray.distill.artifact import load_distilled
from pdd_ray.errors import PddError
from pdd_ray.evaluation import EvalPlan, RunResources, eval_sets_of, format_table, submit_progressive
from pdd_ray.models import ARCHS
from pdd_ray.prepare import prepare
from pdd_ray.runtime import ensure_ray


def reevaluate_artifact(args: argparse.Namespace) -> int:
    """Load the artifact, the real data it was distilled from, and train on its stages."""
    art = load_distilled(args.artifact)
    cfg_dict = dict(art.manifest["provenance"]["config"])
    if args.root:
        cfg_dict["data"] = {**cfg_dict["data"], "root": args.root}
    cfg = build_config(cfg_dict)
    prepared = prepare(cfg)
    if prepared.bundle.digest != art.manifest["dataset"]["digest"]:
        raise PddError(
            f"dataset under {cfg.data.root or cfg.data.dataset} has digest {prepared.bundle.digest}, but the artifact "
            f"was distilled from {art.manifest['dataset']['digest']}; pass --root with the original data"
        )
    archs = [args.arch] if args.arch else [art.spec.arch]
    for arch in archs:
        if arch not in ARCHS:
            raise PddError(f"--arch {arch!r} is not one of {', '.join(ARCHS)}")
    runs = args.runs or cfg.evaluation.runs
    ensure_ray()
    rows, dump = [], {}
    for arch in archs:
        res = submit_progressive(
            "PDD", art.spec.with_arch(arch), art.stages, EvalPlan(art.recipe, runs, cfg.seed, art.carry_optimizer_state),
            eval_sets_of(prepared.bundle), RunResources.of(cfg.evaluation), progress=not args.no_progress,
        ).result()
        dump[arch] = res.to_dict()
        ipc = 0
        for k, stage in enumerate(art.stages):
            ipc += stage.images.shape[0] // art.spec.num_classes
            rows.append((f"PDD stage {k + 1} [{arch}]", f"ipc {ipc}", float(res.mean()[k] * 100), float(res.std()[k] * 100)))
    print(f"artifact {args.artifact}: {art.manifest['dataset']['name']}, {runs} runs")
    print(format_table(rows))
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(dump, indent=2))
    return 0

"""The distilled artifact: a documented, pickle-free directory that travels with its recipe.

Layout (format 1)::

    artifact/
      manifest.json      format, dataset (name, digest, classes, shape), normalisation (mean/std),
                         zca (file or null), model spec, stages [{file, ipc, count, alpha, grid}],
                         evaluation recipe (epochs per stage, momentum, wd, batch, decay, DSA,
                         optimiser carry-over), provenance (config digest, pdd_ray version)
      stage_1.npz ...    images (float32 N,C,H,W in model space) and labels (int64) ADDED at stage k;
                         with learned soft labels (DATM) also soft_labels (float32 N,classes logits):
                         the stage entry says "soft_labels": true and the recipe "labels": "soft"
      zca.npz            the whitening (when ZCA is on): mean, matrix, inverse_matrix
      grid_stage_1.png   the images of stage k, one row per class, in pixel space (inverse ZCA)

The manifest's ``sha256`` maps every other file to its digest; :func:`load_distilled` checks
them all before reading (artifacts written before the digests existed are read unverified).

Users complained that released sets came without their evaluation recipe (MTT #29, DATM #17)
or only in ZCA space (MTT #11); here the manifest says exactly how to train on the stages,
and ``load_distilled`` returns ready-to-train tensors.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pdd_ray import __version__
from pdd_ray.atomic import atomic_path, temp_name
from pdd_ray.data import ZCA
from pdd_ray.errors import PddError
from pdd_ray.evaluation import StageSet
from pdd_ray.image_grid import save_grid, to_pixels
from pdd_ray.integrity import file_sha256, verify_files
from pdd_ray.modelspec import ModelSpec
from pdd_ray.storage import Folder
from pdd_ray.training import TrainRecipe

FORMAT = 1


@dataclass
class Distilled:
    """A loaded artifact: per-stage sets with their learned lr, and how to evaluate them."""

    stages: list[StageSet]
    spec: ModelSpec
    recipe: TrainRecipe
    carry_optimizer_state: bool
    zca: ZCA | None
    manifest: dict

    @property
    def images(self) -> torch.Tensor:
        """The whole union S_1 ∪ ... ∪ S_P."""
        return torch.cat([s.images for s in self.stages])

    @property
    def labels(self) -> torch.Tensor:
        return torch.cat([s.labels for s in self.stages])

    @property
    def soft_labels(self) -> torch.Tensor | None:
        """The union's learned logits (DATM), or None when the artifact has hard labels only."""
        if any(s.soft_labels is None for s in self.stages):
            return None
        return torch.cat([s.soft_labels for s in self.stages])


def _atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


@dataclass(frozen=True)
class DataSpace:
    """The space the images live in: the dataset's identity (name, digest, classes, shape),
    its normalisation and its ZCA whitening (None without)."""

    dataset: dict
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: ZCA | None


def write_artifact(
    path: str | Path | Folder,
    stages: list[StageSet],
    spec: ModelSpec,
    space: DataSpace,
    recipe: TrainRecipe,
    carry_optimizer_state: bool,
    provenance: dict,
    decode: dict | None = None,
) -> Folder:
    """Write the artifact directory; it appears under its final name only when complete.

    ``decode`` (the method's ``decode_info``, e.g. IDC's multi-formation) is recorded as the
    manifest's ``"decode"`` entry; the stage files always hold decoded, ready-to-train images.
    None (MTT, DM) writes no entry, so those manifests are unchanged. In an object store the
    artifact is built in a local temporary folder and uploaded with its manifest last
    (:meth:`pdd_ray.storage.Folder.upload`).
    """
    final = Folder.at(path)
    contents = (stages, spec, space, recipe, carry_optimizer_state, provenance, decode)
    if not final.local:
        with tempfile.TemporaryDirectory(prefix="pdd-ray-artifact-") as tmp:
            _fill(Path(tmp), *contents)
            final.upload(Path(tmp), last="manifest.json")
        return final
    final_path = Path(final)
    tmp_dir = temp_name(final_path)
    tmp_dir.mkdir(parents=True)
    try:
        _fill(tmp_dir, *contents)
        if final_path.exists():
            shutil.rmtree(final_path)
        os.replace(tmp_dir, final_path)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return final


def _fill(folder: Path, stages: list[StageSet], spec: ModelSpec, space: DataSpace, recipe: TrainRecipe,
          carry_optimizer_state: bool, provenance: dict, decode: dict | None) -> None:
    """Write the artifact's files into an empty local folder, the manifest last."""
    entries = _write_stages(folder, stages, spec, space)
    if space.zca is not None:
        space.zca.save(folder / "zca.npz")
    manifest = _manifest(entries, stages, spec, space, recipe, carry_optimizer_state, provenance, decode)
    # a digest per file: load_distilled refuses damaged bytes instead of training on them
    manifest["sha256"] = {f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.is_file()}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _write_stages(tmp_dir: Path, stages: list[StageSet], spec: ModelSpec, space: DataSpace) -> list[dict]:
    """Each stage's NPZ and image grid; returns their manifest entries."""
    mean, std, zca = space.mean, space.std, space.zca
    entries = []
    for k, stage in enumerate(stages, start=1):
        file = f"stage_{k}.npz"
        soft = ({"soft_labels": stage.soft_labels.detach().cpu().float().numpy()}
                if stage.soft_labels is not None else {})
        _atomic_npz(tmp_dir / file, images=stage.images.detach().cpu().float().numpy(),
                    labels=stage.labels.detach().cpu().long().numpy(), **soft)
        grid = f"grid_stage_{k}.png"
        save_grid(to_pixels(stage.images, mean, std, zca), stage.labels.cpu(), spec.num_classes, tmp_dir / grid)
        entries.append({
            "stage": k,
            "file": file,
            "grid": grid,
            "count": int(stage.images.shape[0]),
            "ipc": int(stage.images.shape[0] // max(1, spec.num_classes)),
            "alpha": float(stage.lr),
            "epochs": stage.epochs,
            **({"soft_labels": True} if soft else {}),
        })
    return entries


def _manifest(entries: list[dict], stages: list[StageSet], spec: ModelSpec, space: DataSpace, recipe: TrainRecipe,
              carry_optimizer_state: bool, provenance: dict, decode: dict | None) -> dict:
    """The manifest, less the files' digests."""
    dataset, mean, std, zca = space.dataset, space.mean, space.std, space.zca
    manifest = {
        "format": FORMAT,
        "pdd_ray_version": __version__,
        "dataset": dataset,
        "normalization": {"mean": list(mean), "std": list(std), "zca": "zca.npz" if zca is not None else None},
        "model": spec.to_dict(),
        "stages": entries,
        "evaluation": {**recipe.__dict__, "carry_optimizer_state": carry_optimizer_state,
                       "note": "train one network on stage 1, then the union of stages 1..k with stage k's "
                               "alpha as lr, for `epochs` epochs each; lr x0.1 at half of each stage"},
        "provenance": provenance,
    }
    if decode is not None:
        manifest["decode"] = decode
    if any(st.soft_labels is not None for st in stages):
        manifest["evaluation"]["labels"] = "soft"
        manifest["evaluation"]["labels_note"] = (
            "each stage file holds soft_labels (logits); train with soft cross-entropy against their softmax, "
            "-sum(p * log_softmax(f(x))) averaged over the batch, as DATM; labels name each image's class")
    return manifest


def load_distilled(path: str | Path | Folder) -> Distilled:
    """Read an artifact directory (a local path or an object-store URI such as
    ``s3://bucket/x/runs/digits-<key>/artifact``) into ready-to-train tensors (no pickle anywhere)."""
    root = Folder.at(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise PddError(f"{root} is not a pdd_ray artifact: no manifest.json (expected the 'artifact' folder of a run)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise PddError(f"artifact manifest {manifest_path} is not valid JSON: {exc.msg}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PddError(f"artifact {root} has format {found!r}; this pdd_ray reads format {FORMAT}")
    verified = {}  # artifacts written before digests existed are read unverified
    if "sha256" in manifest:
        verified = verify_files(root, manifest["sha256"], f"artifact {root}",
                                "re-run the run that made it (`pdd-ray run` rewrites the artifact from its stage records)")
    stages = []
    for entry in manifest["stages"]:
        file = root / entry["file"]
        try:
            data = verified[entry["file"]] if entry["file"] in verified else file.read_bytes()
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                images, labels = torch.from_numpy(z["images"].copy()), torch.from_numpy(z["labels"].copy())
                soft = torch.from_numpy(z["soft_labels"].copy()) if entry.get("soft_labels") else None
        except (OSError, KeyError, ValueError) as exc:
            raise PddError(f"artifact stage file {file} is missing or corrupt ({type(exc).__name__})") from None
        stages.append(StageSet(images, labels, lr=float(entry["alpha"]), epochs=entry.get("epochs"), soft_labels=soft))
    zca_file = manifest["normalization"].get("zca")
    zca = None
    if zca_file:  # the verified bytes; else local files are read in place, remote ones fetched
        data = verified.get(zca_file) or (None if root.local else (root / zca_file).read_bytes())
        zca = ZCA.load(str(root / zca_file), data)
    ev = dict(manifest["evaluation"])
    carry = bool(ev.pop("carry_optimizer_state", True))
    for k in ("note", "labels", "labels_note"):
        ev.pop(k, None)
    recipe = TrainRecipe(**ev)
    return Distilled(stages=stages, spec=ModelSpec.from_dict(manifest["model"]), recipe=recipe,
                     carry_optimizer_state=carry, zca=zca, manifest=manifest)

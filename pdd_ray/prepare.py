"""config -> data: load the dataset, whiten it if asked, and describe the network for it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pdd_ray.config import PddConfig
from pdd_ray.data import ZCA, load_dataset
from pdd_ray.data.bundle import DatasetBundle
from pdd_ray.models import check_model_fits
from pdd_ray.modelspec import ModelSpec


@dataclass
class Prepared:
    """The data in the space models are trained in (ZCA space when ZCA is on)."""

    bundle: DatasetBundle
    zca: ZCA | None
    spec: ModelSpec


def data_settings(cfg: PddConfig) -> dict:
    """The data settings that decide which tensors :func:`prepare` produces (part of run keys).

    ``data.download`` is not among them: it only decides whether missing files are fetched.
    ``zca_eps`` counts only with ZCA on.
    """
    d = cfg.data
    return {"dataset": d.dataset, "root": d.root, "val_fraction": d.val_fraction, "split_seed": d.split_seed,
            "test_fraction": d.test_fraction, "normalize": not d.zca, "image_size": d.image_size,
            "zca_eps": d.zca_eps if d.zca else None}


def prepare(cfg: PddConfig) -> Prepared:
    """Load ``cfg.data`` and build the ``ModelSpec`` for ``cfg.model`` on it.

    With ZCA, pixels are *not* mean/std normalised first (as in MTT): the whitening is fitted
    once on the training split and applied to every split. The split seed is fixed by
    ``data.split_seed`` rather than the run seed, so runs with different seeds share experts.
    """
    d = cfg.data
    s = data_settings(cfg)
    bundle = load_dataset(
        s["dataset"],
        s["root"],
        val_fraction=s["val_fraction"],
        seed=s["split_seed"],
        download=d.download,
        test_fraction=s["test_fraction"],
        normalize=s["normalize"],
        image_size=s["image_size"],
    )
    check_model_fits(cfg.model.arch, bundle.image_size, cfg.model.depth)
    zca = None
    if d.zca:
        zca = ZCA.fit(bundle.train_x, eps=s["zca_eps"])
        bundle = replace(
            bundle,
            train_x=zca.apply(bundle.train_x),
            val_x=zca.apply(bundle.val_x),
            test_x=zca.apply(bundle.test_x),
        )
    spec = ModelSpec(
        arch=cfg.model.arch,
        channels=bundle.channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
        width=cfg.model.width,
        depth=cfg.model.depth,
        norm=cfg.model.norm,
        pooling=cfg.model.pooling,
    )
    return Prepared(bundle=bundle, zca=zca, spec=spec)

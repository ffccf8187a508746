"""The names pdd_ray accepts, each list written once.

Torch-free on purpose: :mod:`pdd_ray.config` validates against these before anything heavy is
imported, and the implementations (the dataset registry, the model factory, DSA, the unrolls,
the base methods) import the same lists, so adding a dataset, an architecture or a base method
touches its implementation and this module only. ``tests/test_names.py`` checks that every
implementation serves exactly the names listed here.
"""

from __future__ import annotations

import math

#: Image side length each built-in dataset serves (``imagefolder`` depends on the data).
DATASET_IMAGE_SIZES: dict[str, int | None] = {
    "digits": 8,
    "mnist": 28,
    "fashion_mnist": 28,
    "svhn": 32,
    "cifar10": 32,
    "cifar100": 32,
    "tiny_imagenet": 64,
    "imagefolder": None,
}

#: Dataset names, in the order the README lists them.
DATASETS: tuple[str, ...] = tuple(DATASET_IMAGE_SIZES)

#: Model architectures (``model.arch``, ``evaluation.archs``).
ARCHS: tuple[str, ...] = ("convnet", "resnet18", "vgg11", "alexnet")

#: Normalisation layers and pooling of the ConvNet (``model.norm``, ``model.pooling``).
NORMS: tuple[str, ...] = ("instance", "batch", "none")
POOLINGS: tuple[str, ...] = ("avg", "max")

#: DSA augmentation families, joined by ``_`` in a strategy (``augment.strategy``).
DSA_FAMILIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")

#: Unroll modes of the matching loss (``distill.unroll``).
UNROLLS: tuple[str, ...] = ("full", "checkpoint", "tesla")

#: Base distillation methods (``distill.method``), keys of ``pdd_ray.distill.methods.METHODS``.
METHODS: tuple[str, ...] = ("mtt", "dm", "idc", "datm")

#: Smallest image side any model takes.
MIN_IMAGE_SIZE = 8


def max_convnet_depth(image_size: int) -> int:
    """The deepest ConvNet an ``image_size`` x ``image_size`` image fits: each block halves it,
    and at least one pixel must remain."""
    return int(math.floor(math.log2(image_size)))

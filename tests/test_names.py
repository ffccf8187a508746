"""Each list of names lives once (``pdd_ray.names``): the config accepts exactly what the
implementations serve."""

from __future__ import annotations

import typing

import pytest

from pdd_ray import names
from pdd_ray.config import PddConfig, load_config


def _literal(section: str, key: str) -> tuple:
    """The values a ``Literal`` config field accepts (``tuple[Literal[...], ...]`` included)."""
    ann = PddConfig.model_fields[section].annotation.model_fields[key].annotation
    while typing.get_origin(ann) is not typing.Literal:
        ann = typing.get_args(ann)[0]
    return typing.get_args(ann)


def test_config_accepts_exactly_the_listed_names():
    assert _literal("model", "arch") == names.ARCHS
    assert _literal("model", "norm") == names.NORMS
    assert _literal("model", "pooling") == names.POOLINGS
    assert _literal("evaluation", "archs") == names.ARCHS
    assert _literal("distill", "method") == names.METHODS
    assert _literal("distill", "unroll") == names.UNROLLS


def test_implementations_serve_exactly_the_listed_names():
    from pdd_ray.augment import FAMILIES
    from pdd_ray.data.registry import _SPECS, DATASETS
    from pdd_ray.distill.match import UNROLLS
    from pdd_ray.distill.methods import METHODS
    from pdd_ray.models import ARCHS, NORMS, POOLINGS

    assert tuple(_SPECS) == DATASETS == names.DATASETS
    assert ARCHS == names.ARCHS and NORMS == names.NORMS and POOLINGS == names.POOLINGS
    assert FAMILIES == names.DSA_FAMILIES
    assert UNROLLS == names.UNROLLS
    assert tuple(METHODS) == names.METHODS


@pytest.mark.parametrize("size", [8, 9, 28, 32, 64, 100])
def test_model_size_check_agrees_with_the_factory(size):
    """The config refuses exactly the ConvNet depths the model factory refuses."""
    from pdd_ray.errors import PddError
    from pdd_ray.models import check_model_fits

    for depth in range(1, 9):
        try:
            check_model_fits("convnet", size, depth)
            fits = True
        except PddError:
            fits = False
        try:
            load_config("digits", [f"data.image_size={size}", f"model.depth={depth}"])
            accepted = True
        except PddError:
            accepted = False
        assert fits == accepted, (size, depth)


def test_names_module_is_torch_free():
    import subprocess
    import sys

    code = "import sys, pdd_ray.names, pdd_ray.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

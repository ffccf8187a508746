"""Registry of base distillation methods (see ``base.py`` for the interface)."""

from __future__ import annotations

from pdd_ray.distill.methods.base import BaseMethod, ConditionedPool, Update
from pdd_ray.distill.methods.datm import DatmMethod
from pdd_ray.distill.methods.dm import DmMethod
from pdd_ray.distill.methods.idc import IdcMethod
from pdd_ray.distill.methods.mtt import MttMethod
from pdd_ray.errors import PddError

METHODS: dict[str, type[BaseMethod]] = {m.name: m for m in (MttMethod, DmMethod, IdcMethod, DatmMethod)}


def method_class(name: str) -> type[BaseMethod]:
    """The class registered under ``name``; a one-line error lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise PddError(f"distill.method = {name!r} is not a known base method; expected one of {sorted(METHODS)}") from None


__all__ = ["METHODS", "BaseMethod", "ConditionedPool", "Update", "method_class"]

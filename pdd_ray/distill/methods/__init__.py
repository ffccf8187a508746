"""Registry of base distillation methods (see ``base.py`` for the interface)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pdd_ray.distill.methods.base import (BaseMethod, Conditioning, ConditioningNets, MethodContext, SettingsContext,
                                          StageSets, Update)
from pdd_ray.distill.methods.datm import DatmMethod
from pdd_ray.distill.methods.dm import DmMethod
from pdd_ray.distill.methods.idc import IdcMethod
from pdd_ray.distill.methods.mtt import MttMethod
from pdd_ray.errors import PddError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pdd_ray.config import PddConfig

METHODS: dict[str, type[BaseMethod]] = {m.name: m for m in (MttMethod, DmMethod, IdcMethod, DatmMethod)}


def method_class(name: str) -> type[BaseMethod]:
    """The class registered under ``name``; a one-line error lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise PddError(f"distill.method = {name!r} is not a known base method; expected one of {sorted(METHODS)}") from None


def method_section(cfg: PddConfig) -> Any:
    """The config's base method's own section (``cfg.dm``, ``cfg.idc``, ``cfg.datm``), None for MTT."""
    section = method_class(cfg.distill.method).section
    return getattr(cfg, section) if section else None


def method_settings(cfg: PddConfig, num_classes: int, stage: int) -> dict[str, Any]:
    """The base method's settings for ``stage`` (:meth:`BaseMethod.stage_settings`): only this
    and :func:`method_image_lr` hand a method its sections out of the whole config."""
    ctx = SettingsContext(cfg.distill, num_classes, stage)
    return method_class(cfg.distill.method).stage_settings(ctx, method_section(cfg))


def method_image_lr(cfg: PddConfig) -> float:
    """The base method's image learning rate (:meth:`BaseMethod.image_lr`)."""
    return method_class(cfg.distill.method).image_lr(cfg.distill, method_section(cfg))


__all__ = ["METHODS", "BaseMethod", "Conditioning", "ConditioningNets", "MethodContext", "SettingsContext",
           "StageSets", "Update", "method_class", "method_image_lr", "method_section", "method_settings"]

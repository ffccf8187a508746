"""The base-method interface: what differs between MTT, DM, IDC… inside one PDD stage.

PDD is a framework around a base distillation method. Everything else — the stage loop,
freezing S_<k, the image optimiser, the gradient all-reduce across Ray Train workers,
validation-based selection, checkpoints and resume, artifacts, tracking and evaluation — is
shared (``pdd_ray.distill.stage`` and ``pdd_ray.distill.driver``). A method only says how one
outer iteration turns the current new images into a gradient, plus a few static facts the
driver needs to prepare its inputs. Adding a method means one module here, its name in
``pdd_ray.names.METHODS``, its class in ``METHODS`` (``__init__.py``; ``tests/test_names.py``
checks the two agree) and, if it has settings, one config section.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from pdd_ray.errors import PddError

from pdd_ray.experts.store import TrajectoryStore
from pdd_ray.experts.trajectory import load_start_params

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ray import ObjectRef

    from pdd_ray.config import DistillConfig
    from pdd_ray.modelspec import ModelSpec


@dataclass(frozen=True)
class StageSets:
    """A stage's images in model space: the frozen earlier stages S_<k and the new images'
    start, with their labels (and, under DATM, learned logits; None for hard labels)."""

    frozen_images: torch.Tensor
    frozen_labels: torch.Tensor
    init_images: torch.Tensor
    new_labels: torch.Tensor
    init_soft_labels: torch.Tensor | None = None
    frozen_soft_labels: torch.Tensor | None = None


@dataclass(frozen=True)
class Conditioning:
    """Where a stage's conditioning networks live: the trajectory store, their key (None:
    fresh networks) and the expert indices present."""

    store_root: str
    key: str | None
    indices: list[int]


@dataclass(frozen=True)
class MethodContext:
    """What a base method sees on a Ray Train worker: the stage, its seed, the network, the
    augmentation, its own settings for the stage (:meth:`BaseMethod.stage_settings`), the
    images, the conditioning networks and the real examples it may draw from."""

    stage: int
    seed: int
    spec: ModelSpec
    augment: str
    settings: dict[str, Any]
    sets: StageSets
    conditioning: Conditioning
    #: (train_x, train_y) after forgetting-score discarding, for methods that read real data;
    #: an ObjectRef on workers (unit tests may pass the tuple itself)
    real_ref: ObjectRef | tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class SettingsContext:
    """What a method's per-stage settings may read besides its own config section: the
    ``distill`` section, the number of classes and the stage."""

    distill: DistillConfig
    num_classes: int
    stage: int


@dataclass
class Update:
    """One outer iteration's result on one worker, before the all-reduce.

    ``grad_alpha`` is None for methods that do not learn the step size, ``grad_labels`` for
    methods without learned soft labels (DATM has them).
    """

    loss: float
    grad_images: torch.Tensor
    grad_alpha: torch.Tensor | None = None
    grad_labels: torch.Tensor | None = None


def mean_update(updates: list[Update]) -> Update:
    """Element-wise mean of several updates (each field None in all or in none of them)."""
    def mean(values: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if values[0] is None else torch.stack(values).mean(0)

    return Update(
        loss=sum(u.loss for u in updates) / len(updates),
        grad_images=mean([u.grad_images for u in updates]),
        grad_alpha=mean([u.grad_alpha for u in updates]),
        grad_labels=mean([u.grad_labels for u in updates]),
    )


class ConditioningNets:
    """Networks the stage starts from, read lazily from the trajectory store.

    Stage 1: the stage-1 experts' initial weights (random inits). Stage k > 1: models trained
    on S_<k (the transition's snapshot 0) — PDD's conditioning on the frozen stages. For MTT
    the same files carry the expert trajectories; other methods store only snapshot 0.
    None of them (no key) means "fresh random networks".
    """

    def __init__(self, where: Conditioning) -> None:
        self.store = TrajectoryStore(where.store_root) if where.key else None
        self.key = where.key
        self.indices = list(where.indices) if where.key else []
        self._readers: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def close(self) -> None:
        """Close the members' store files: a worker opens up to one per expert, and on a
        long-lived Ray worker process they would otherwise stay open (memory maps, or remote
        file handles with ``s3://``) after the stage."""
        readers, self._readers = self._readers, {}
        for reader in readers.values():
            reader.close()

    def weights(self, index: int, epoch: int, device: torch.device) -> torch.Tensor:
        """Flat weights of network ``index`` after ``epoch`` recorded epochs."""
        if self.store is None:
            raise RuntimeError("no conditioning networks: no weights to read")
        if index not in self._readers:
            self._readers[index] = self.store.open(self.key, index)
        return load_start_params(self._readers[index].params_at_epoch(epoch)).to(device)


def check_real_classes(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Refuse real examples with a class that has none: per-class matching (DM's means,
    IDC's cross-entropy gradients) of an empty batch is NaN or silently skips the class."""
    counts = torch.bincount(labels.detach().cpu().long(), minlength=num_classes)
    empty = [c for c in range(num_classes) if int(counts[c]) == 0]
    if empty:
        raise PddError(f"{where}: the real pool has no example of class(es) {empty}; lower "
                       "distill.discard_fraction or raise distill.discard_min_per_class")


class BaseMethod(ABC):
    """One base distillation method, instantiated once per Ray Train worker and stage."""

    #: name used in configs (``distill.method`` or the top-level ``method`` shortcut)
    name: ClassVar[str]
    #: learns the per-stage step size α (MTT); otherwise α stays ``distill.lr_init``
    learns_alpha: ClassVar[bool] = False
    #: needs expert trajectories on real data (stage-1 experts, transitions with real epochs);
    #: otherwise transitions only produce networks trained on S_<=k (snapshot 0)
    needs_trajectories: ClassVar[bool] = False
    #: reads real training images inside the stage (``MethodContext.real_ref``)
    needs_real_data: ClassVar[bool] = False
    #: its own config section (``cfg.dm``, ``cfg.idc``, ``cfg.datm``); None: settings in ``distill``
    section: ClassVar[str | None] = None

    def __init__(self, ctx: MethodContext, device: torch.device) -> None:
        self.ctx = ctx
        self.device = device
        self.settings = ctx.settings
        self.nets = ConditioningNets(ctx.conditioning)
        #: the new images' learnable logits (set by the stage loop when the task has soft labels)
        self.soft_labels: torch.Tensor | None = None

    def load_real(self) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """The stage's real examples (``real_ref``: after forgetting-score discarding) on the
        device, and each class's row indices. Unit tests may pass the (x, y) tuple directly."""
        import ray

        ref = self.ctx.real_ref
        x, y = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        check_real_classes(y, self.ctx.spec.num_classes, f"stage {self.ctx.stage}")
        x, y = x.to(self.device), y.to(self.device)
        return x, y, {c: torch.nonzero(y == c).flatten() for c in range(self.ctx.spec.num_classes)}

    @classmethod
    def stage_settings(cls, ctx: SettingsContext, section: Any) -> dict[str, Any]:
        """Method settings for ``ctx.stage`` (plain values, sent to every worker in the task)
        from ``section`` (the method's own config section, None without one)."""
        return {}

    @classmethod
    def image_lr(cls, distill: DistillConfig, section: Any) -> float:
        """Learning rate of the images' SGD (momentum 0.5); ``distill.lr_img`` by default."""
        return distill.lr_img

    @classmethod
    def decode(cls, settings: dict[str, Any], images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored images → training images (identity except for IDC's multi-formation).

        ``settings`` are the method's ``stage_settings``. Everything that trains on a union (in-loop
        validation, transitions, the progressive evaluator, the artifact reader) sees decoded
        images; the optimiser and the frozen stages hold stored ones.
        """
        return images, labels

    @classmethod
    def decode_info(cls, settings: dict[str, Any]) -> dict[str, Any] | None:
        """What the artifact manifest records about ``decode`` (None: identity, nothing recorded)."""
        return None

    @classmethod
    def init_images(cls, settings: dict[str, Any], bundle: Any, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Initial stored images and labels of a stage, ``ipc`` per class in class-major order;
        None (the default) lets the driver start from ``ipc`` random real images per class."""
        return None

    @classmethod
    def init_soft_labels(cls, settings: dict[str, Any], bundle: Any, ipc: int, seed: int, spec: ModelSpec,
                         conditioning: Conditioning) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Initial stored images, labels and learnable logits of a stage with soft labels;
        None (the default): no soft labels."""
        return None

    def project(self, images: torch.Tensor) -> None:
        """In-place constraint applied after every image step (IDC clamps to the pixel range)."""

    def close(self) -> None:
        """Release what the method holds open (the conditioning networks' files); the stage
        worker calls it when the stage ends, however it ends."""
        self.nets.close()

    def validation_init(self, run: int) -> torch.Tensor | None:
        """Starting weights of in-loop validation run ``run``: a conditioning network, so the
        check is itself progressive; None (a fresh seeded network) when there are none."""
        if not len(self.nets):
            return None
        return self.nets.weights(self.nets.indices[run % len(self.nets)], 0, torch.device("cpu"))

    @abstractmethod
    def update(
        self,
        iteration: int,
        rank: int,
        new_images: torch.Tensor,
        alpha: torch.Tensor,
        g: torch.Generator,
    ) -> Update:
        """Loss and gradient for the new images (and α when ``learns_alpha``) on this worker.

        ``new_images`` requires grad; ``g`` is this (stage, iteration, rank)'s generator, the
        only source of randomness allowed, so a resumed run repeats the same draws.
        """

    def update_many(
        self,
        iteration: int,
        ranks: list[int],
        new_images: torch.Tensor,
        alpha: torch.Tensor,
        gens: list[torch.Generator],
    ) -> Update:
        """The mean of ``update`` over several samples, one per (rank, generator) pair: what as
        many workers with those ranks would all-reduce (``distill.trajectories_per_worker``).
        This default runs them one after another; a method with a batched form (MTT's full
        unroll) overrides it."""
        return mean_update([self.update(iteration, r, new_images, alpha, g) for r, g in zip(ranks, gens)])

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
    from pdd_ray.config import PddConfig
    from pdd_ray.distill.stage import StageTask


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


class ConditionedPool:
    """Networks the stage starts from, read lazily from the trajectory store.

    Stage 1: the stage-1 experts' initial weights (random inits). Stage k > 1: models trained
    on S_<k (the transition's snapshot 0) — PDD's conditioning on the frozen stages. For MTT
    the same files carry the expert trajectories; other methods store only snapshot 0.
    An empty pool (no key) means "fresh random networks".
    """

    def __init__(self, store_root: str, key: str | None, indices: list[int]) -> None:
        self.store = TrajectoryStore(store_root) if key else None
        self.key = key
        self.indices = list(indices) if key else []
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

    def params(self, index: int, epoch: int, device: torch.device) -> torch.Tensor:
        """Flat parameters of pool member ``index`` after ``epoch`` recorded epochs."""
        if self.store is None:
            raise RuntimeError("empty conditioning pool has no parameters")
        if index not in self._readers:
            self._readers[index] = self.store.open(self.key, index)
        return load_start_params(self._readers[index].params_at_epoch(epoch)).to(device)


def check_real_classes(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Refuse a real pool with a class that has no example: per-class matching (DM's means,
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
    #: reads real training images inside the stage (``task.real_ref``)
    needs_real_data: ClassVar[bool] = False

    def __init__(self, task: StageTask, device: torch.device) -> None:
        self.task = task
        self.device = device
        self.params = task.params
        self.pool = ConditionedPool(task.store_root, task.expert_key, task.expert_indices)
        #: the new images' learnable logits (set by the stage loop when the task has soft labels)
        self.soft_labels: torch.Tensor | None = None

    def load_real(self) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """The stage's real pool (``task.real_ref``: after forgetting-score discarding) on the
        device, and each class's row indices. Unit tests may pass the (x, y) tuple directly."""
        import ray

        ref = self.task.real_ref
        x, y = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        check_real_classes(y, self.task.spec.num_classes, f"stage {getattr(self.task, 'stage', '?')}")
        x, y = x.to(self.device), y.to(self.device)
        return x, y, {c: torch.nonzero(y == c).flatten() for c in range(self.task.spec.num_classes)}

    @classmethod
    def stage_params(cls, cfg: PddConfig, num_classes: int, stage: int) -> dict[str, Any]:
        """Method settings for ``stage`` (plain values, sent to every worker in the task)."""
        return {}

    @classmethod
    def image_lr(cls, cfg: PddConfig) -> float:
        """Learning rate of the images' SGD (momentum 0.5); ``distill.lr_img`` by default."""
        return cfg.distill.lr_img

    @classmethod
    def decode(cls, params: dict[str, Any], images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored images → training images (identity except for IDC's multi-formation).

        ``params`` are the method's ``stage_params``. Everything that trains on a union (in-loop
        validation, transitions, the progressive evaluator, the artifact reader) sees decoded
        images; the optimiser and the frozen stages hold stored ones.
        """
        return images, labels

    @classmethod
    def decode_info(cls, params: dict[str, Any]) -> dict[str, Any] | None:
        """What the artifact manifest records about ``decode`` (None: identity, nothing recorded)."""
        return None

    @classmethod
    def init_images(cls, params: dict[str, Any], bundle: Any, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Initial stored images and labels of a stage, ``ipc`` per class in class-major order;
        None (the default) lets the driver start from ``ipc`` random real images per class."""
        return None

    @classmethod
    def init_soft_labels(cls, params: dict[str, Any], bundle: Any, ipc: int, seed: int, spec: Any, store_root: str,
                         expert_key: str | None, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Initial stored images, labels and learnable logits of a stage with soft labels;
        None (the default): no soft labels."""
        return None

    def project(self, images: torch.Tensor) -> None:
        """In-place constraint applied after every image step (IDC clamps to the pixel range)."""

    def close(self) -> None:
        """Release what the method holds open (the conditioning pool's files); the stage
        worker calls it when the stage ends, however it ends."""
        self.pool.close()

    def validation_init(self, run: int) -> torch.Tensor | None:
        """Starting weights of in-loop validation run ``run``: a conditioned pool member, so
        the check is itself progressive; None (a fresh seeded network) when the pool is empty."""
        if not len(self.pool):
            return None
        return self.pool.params(self.pool.indices[run % len(self.pool)], 0, torch.device("cpu"))

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

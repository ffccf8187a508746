"""Typed configuration: YAML presets in ``configs/`` validated into frozen objects.

Why pydantic: a typo in a hyper-parameter is the most common way a distillation run wastes
a GPU-day (peers' READMEs swapped IPC commands, had unused flags, table typos). Every key is
declared here with its type and bounds, unknown keys are refused with a suggestion, and the
CLI turns any violation into one line naming the key, the value and what is accepted.

The data flow is config -> data -> experts -> stages -> evaluation -> tracking; this module
knows nothing about the later steps except the static facts it needs to validate early
(for example the image size each built-in dataset serves, so a model that cannot take it is
refused before anything is loaded).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdd_ray.errors import PddError
from pdd_ray.names import (ARCHS, DATASET_IMAGE_SIZES, DSA_FAMILIES, METHODS, MIN_IMAGE_SIZE, NORMS, POOLINGS,
                           UNROLLS, max_convnet_depth)

#: Where the presets live: ``<repo>/configs`` (the package is installed editable, or run from
#: a Ray job's uploaded working directory, so the folder sits beside the package).
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Section(BaseModel):
    """Base for every config section: unknown keys are errors, objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DataConfig(_Section):
    """Which real dataset to distill and how it is split and preprocessed."""

    dataset: str = "digits"
    root: str | None = None
    download: bool = False
    val_fraction: float = Field(0.1, gt=0.0, le=0.5)
    split_seed: int = Field(0, ge=0)
    test_fraction: float = Field(0.2, gt=0.0, le=0.5)
    image_size: int | None = Field(None, ge=8, le=512)
    zca: bool = False
    zca_eps: float = Field(0.1, gt=0.0)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in DATASET_IMAGE_SIZES:
            raise ValueError(_choice_message(v, DATASET_IMAGE_SIZES))
        return v

    @property
    def resolved_image_size(self) -> int | None:
        """Image side the model will see, when it is known before loading any data."""
        if self.image_size is not None:
            return self.image_size
        return DATASET_IMAGE_SIZES[self.dataset]


class ModelConfig(_Section):
    """The network distilled for (ConvNet) or evaluated across (the others)."""

    arch: Literal[ARCHS] = "convnet"
    width: int = Field(128, gt=0, le=4096)
    depth: int | None = Field(None, ge=1, le=8)
    norm: Literal[NORMS] = "instance"
    pooling: Literal[POOLINGS] = "avg"


class AugmentConfig(_Section):
    """Differentiable Siamese augmentation (DSA); ``strategy: none`` switches it off."""

    strategy: str = "color_crop_cutout_flip_scale_rotate"

    @field_validator("strategy")
    @classmethod
    def _known_families(cls, v: str) -> str:
        families = DSA_FAMILIES
        if v in ("", "none"):
            return "none"
        for part in v.split("_"):
            if part not in families:
                raise ValueError(
                    f"unknown augmentation family '{part}'; use families from {', '.join(families)} "
                    "joined by '_', or 'none'"
                )
        return v


class ExpertsConfig(_Section):
    """Expert trajectories trained on real data (the teachers trajectory matching imitates)."""

    num_experts: int = Field(10, ge=1)
    epochs: int = Field(30, ge=1)
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(256, ge=1)
    keep_all_epochs: bool = False
    cpus: float = Field(1.0, gt=0.0)
    gpus: float = Field(0.0, ge=0.0)
    storage: str | None = None  # trajectory store root; default <storage>/experts


class DistillConfig(_Section):
    """PDD stages on top of the base distillation method."""

    method: Literal[METHODS] = "mtt"  # implementations: pdd_ray.distill.methods.METHODS
    num_stages: int = Field(5, ge=1, le=100)
    ipc_per_stage: int = Field(2, ge=1)
    iterations: int = Field(5000, ge=0)
    syn_steps: int = Field(20, ge=1)
    expert_epochs: int = Field(2, ge=1)
    max_start_epoch: int = Field(20, ge=1)
    lr_img: float = Field(1000.0, gt=0.0)
    lr_lr: float = Field(1e-5, ge=0.0)
    lr_init: float = Field(0.01, gt=0.0)
    batch_syn: int | None = Field(None, ge=1)
    batch_syn_policy: Literal["stage", "union"] = "stage"
    unroll: Literal[UNROLLS] = "full"
    eval_every: int = Field(100, ge=1)
    eval_runs: int = Field(2, ge=1)
    eval_epochs: int = Field(300, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1)
    # K samples (expert, start epoch) per worker and iteration, averaged like K more workers:
    # W workers x K is the same estimate as W*K workers of 1 (distill/match.py: match_many)
    trajectories_per_worker: int = Field(1, ge=1, le=64)
    use_gpu: bool = False
    # a Train worker's share of one GPU (with use_gpu): 0.5 puts two workers on each device,
    # which keeps a GPU busy when one small stage's unroll cannot
    gpus_per_worker: float = Field(1.0, gt=0.0)
    # process-group timeout of the stage's collectives (torch.distributed, seconds). It must
    # outlast the longest time one rank spends away from them: a validation round at CIFAR or
    # Tiny ImageNet size takes tens of minutes, and torch's 30-minute default would restart the
    # workers mid-stage and repeat that round until max_failures ends the run
    collective_timeout_s: int = Field(7200, ge=60)
    max_failures: int = Field(2, ge=0)
    transition_syn_epochs: int = Field(300, ge=0)
    transition_experts: int | None = Field(None, ge=1)
    # forgetting-score discarding (pdd-reference §8, our reconstruction): from stage
    # discard_from_stage on, floor(discard_fraction * n) easiest real examples are left out
    discard_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    discard_from_stage: int = Field(2, ge=2)
    # the discard is per class and never leaves a class fewer real examples than this
    discard_min_per_class: int = Field(1, ge=1)
    # torch.use_deterministic_algorithms in the stage workers: resume bit-identical on GPU too
    deterministic: bool = False

    @property
    def total_ipc(self) -> int:
        """Images per class of the final union."""
        return self.num_stages * self.ipc_per_stage


class DmConfig(_Section):
    """Distribution matching (``method: dm``; Zhao & Bilen 2023) as PDD's base method."""

    batch_real: int = Field(256, ge=1)  # real images per class in each iteration's class mean
    lr_img: float = Field(1.0, gt=0.0)  # the images' SGD lr (momentum 0.5), DM's default; not distill.lr_img


class IdcConfig(_Section):
    """IDC (``method: idc``; Kim et al. 2022) as PDD's base method: gradient matching on
    multi-formation-decoded images (``pdd_ray/distill/methods/idc.py``). Defaults sized for digits."""

    factor: int = Field(2, ge=1, le=8)  # each stored image decodes to factor**2 training images
    init: Literal["mix", "real"] = "mix"  # mix: factor**2 real images downsampled into the quadrants
    batch_real: int = Field(64, ge=1)  # real images per class per matching step
    batch_syn_max: int = Field(128, ge=1)  # decoded synthetic images per class per matching step, at most
    inner_loop: int = Field(10, ge=1)  # a new matching network every inner_loop iterations
    net_steps: int = Field(5, ge=0)  # real-data SGD steps of the network after each matching step
    batch_train: int = Field(128, ge=1)  # real images per network step
    net_lr: float = Field(0.01, gt=0.0)
    net_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    net_weight_decay: float = Field(5e-4, ge=0.0)
    lr_img: float = Field(0.2, gt=0.0)  # the images' SGD lr (momentum 0.5); not distill.lr_img (see README)
    augment: str | None = None  # DSA for matching and network steps; null: augment.strategy
    augment_mode: Literal["all", "single"] = "all"  # IDC applies every family (one shared draw)

    @field_validator("augment")
    @classmethod
    def _known_families(cls, v: str | None) -> str | None:
        return None if v is None else AugmentConfig._known_families(v)


class DatmConfig(_Section):
    """DATM (``method: datm``; Guo et al., ICLR 2024) as PDD's base method: MTT with learned
    soft labels and a difficulty-aligned start-epoch window (``pdd_ray/distill/methods/datm.py``).
    The matching settings (``syn_steps``, ``expert_epochs``, ``lr_img``, ``lr_lr``, ...) stay
    in ``distill``; only what DATM adds lives here."""

    soft_labels: bool = True  # learn per-image logits (init: an expert's logits on correctly classified reals)
    lr_labels: float = Field(2.0, gt=0.0)  # the logits' SGD lr (DATM's lr_y)
    momentum_labels: float = Field(0.9, ge=0.0, lt=1.0)  # DATM's Momentum_y
    label_epoch: int | None = Field(None, ge=0)  # the labelling expert's epoch; null: its last recorded one
    min_start_epoch: int = Field(0, ge=0)  # start epochs are drawn from [min, upper)
    max_start_epoch: int | None = Field(None, ge=1)  # initial upper bound; null: distill.max_start_epoch
    max_start_epoch_final: int | None = Field(None, ge=1)  # upper bound reached by growth; null: no growth
    expansion_iterations: int | None = Field(None, ge=1)  # iterations to reach it (linear); null: the stage's
    stage_shift: int = Field(0, ge=0)  # every later stage moves the whole window this many epochs later


class EvalConfig(_Section):
    """The progressive evaluator and the baselines that share its harness."""

    runs: int = Field(5, ge=1)
    epochs_per_stage: int = Field(300, ge=1)
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    batch_size: int = Field(256, ge=1)
    lr_decay_at_half: bool = True
    carry_optimizer_state: bool = True
    augment: bool = True
    full_epochs: int = Field(60, ge=1)
    full_batch_size: int = Field(128, ge=1)
    baselines: bool = True  # random-subset and full-data rows (`pdd-ray run --no-baselines` turns them off)
    archs: tuple[Literal[ARCHS], ...] = ("convnet",)
    cpus_per_run: float = Field(1.0, gt=0.0)
    gpus_per_run: float = Field(0.0, ge=0.0)


class TrackingConfig(_Section):
    """MLflow tracking; ``uri`` null means ``sqlite:///<storage>/mlflow.db``."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "pdd_ray"


class PddConfig(_Section):
    """Everything one pdd_ray run depends on."""

    name: str = "run"
    seed: int = Field(0, ge=0)
    storage: str = "outputs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    experts: ExpertsConfig = ExpertsConfig()
    distill: DistillConfig = DistillConfig()
    dm: DmConfig = DmConfig()
    idc: IdcConfig = IdcConfig()
    datm: DatmConfig = DatmConfig()
    evaluation: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _method_shortcut(cls, data: Any) -> Any:
        """``method: idc`` at the top level (``pdd-ray run digits method=idc``) means
        ``distill.method``; both at once must agree."""
        if not isinstance(data, dict) or "method" not in data:
            return data
        data = dict(data)
        method = data.pop("method")
        distill = dict(data.get("distill") or {})
        if "distill" in data and not isinstance(data["distill"], dict):
            return data
        if "method" in distill and distill["method"] != method:
            raise ValueError(f"method = {method!r} and distill.method = {distill['method']!r} disagree; set one of them")
        distill["method"] = method
        data["distill"] = distill
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> PddConfig:
        d = self.distill
        size = self.data.resolved_image_size
        if size is not None:
            _check_model_size(self.model.arch, size, self.model.depth)
        if d.max_start_epoch + d.expert_epochs > self.experts.epochs:
            raise ValueError(
                f"distill.max_start_epoch + distill.expert_epochs = {d.max_start_epoch + d.expert_epochs} "
                f"exceeds experts.epochs = {self.experts.epochs}; matching targets must lie inside the "
                "recorded trajectories"
            )
        if d.gpus_per_worker != 1.0 and not d.use_gpu:
            raise ValueError(f"distill.gpus_per_worker = {d.gpus_per_worker} needs distill.use_gpu: true")
        if self.experts.gpus > 0 and not d.use_gpu:
            raise ValueError(f"experts.gpus = {self.experts.gpus} needs distill.use_gpu: true")
        if d.method == "idc" and size is not None and size % self.idc.factor:
            raise ValueError(f"idc.factor = {self.idc.factor} does not divide the image size {size}; "
                             "multi-formation needs equal patches")
        if d.method == "datm":
            _check_datm(self)
        if d.trajectories_per_worker > 1 and d.method not in ("mtt", "datm"):
            raise ValueError(f"distill.trajectories_per_worker = {d.trajectories_per_worker} needs a trajectory-"
                             f"matching method (mtt or datm), not {d.method!r}; use more distill.num_workers")
        return self

    @property
    def storage_root(self) -> str:
        """``storage`` as an absolute path or a URI (Ray and pyarrow refuse relative paths)."""
        return absolute_storage(self.storage)

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"distill.ipc_per_stage": 2, ...}``: for MLflow params and store keys."""
        return flatten_dict(self.model_dump(mode="json"))


def absolute_storage(storage: str) -> str:
    """Make a local storage path absolute; leave URIs (``s3://``, ``file://``...) alone."""
    if "://" in storage:
        return storage.rstrip("/")
    return str(Path(storage).expanduser().resolve())


def _check_datm(cfg: PddConfig) -> None:
    """The DATM window must be non-empty and every stage's matching target inside the
    recorded trajectories; soft-label gradients exist only for the full unroll."""
    d, w = cfg.distill, cfg.datm
    upper = w.max_start_epoch if w.max_start_epoch is not None else d.max_start_epoch
    if w.min_start_epoch >= upper:
        raise ValueError(f"datm.min_start_epoch = {w.min_start_epoch} must be below the window's upper bound "
                         f"{upper} (datm.max_start_epoch, or distill.max_start_epoch when unset)")
    if w.max_start_epoch_final is not None and w.max_start_epoch_final < upper:
        raise ValueError(f"datm.max_start_epoch_final = {w.max_start_epoch_final} is below the initial upper bound "
                         f"{upper}; the window only grows")
    reach = max(upper, w.max_start_epoch_final or 0) + w.stage_shift * (d.num_stages - 1) + d.expert_epochs
    if reach > cfg.experts.epochs:
        raise ValueError(f"the DATM window reaches epoch {reach} at stage {d.num_stages} (upper bound + "
                         f"datm.stage_shift x (stages - 1) + distill.expert_epochs) but experts.epochs = "
                         f"{cfg.experts.epochs}; matching targets must lie inside the recorded trajectories")
    if w.soft_labels and d.unroll != "full":
        raise ValueError(f"datm.soft_labels needs distill.unroll = 'full' (got {d.unroll!r}); the memory-bounded "
                         "unrolls do not differentiate the labels")


def _check_model_size(arch: str, size: int, depth: int | None) -> None:
    """Refuse a model that cannot take the dataset's image size, before any data is read."""
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size {size} is too small; models need at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}")
    max_depth = max_convnet_depth(size)
    if arch == "convnet" and depth is not None and depth > max_depth:
        raise ValueError(
            f"model.depth = {depth} is too deep for {size}x{size} images: "
            f"at most {max_depth} halvings fit (or leave depth unset)"
        )


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_dict(value, name + "."))
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------------------------
# Loading, overrides and error messages
# ----------------------------------------------------------------------------------------------


def _all_keys(model: type[BaseModel] = PddConfig, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_all_keys(ann, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _choice_message(value: Any, choices: Any) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"'{value}' is not one of {', '.join(map(str, choices))}{hint}"


def _format_validation_error(err: ValidationError, data: dict[str, Any]) -> str:
    """Turn pydantic's multi-line report into our one-line message for the first problem."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not isinstance(p, int))
    kind = first["type"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(loc, _all_keys(), n=1, cutoff=0.5)
        if not close:  # compare the last component too: 'distill.ipcc' ~ 'ipc_per_stage'
            leaf = loc.rsplit(".", 1)[-1]
            leaves = {k.rsplit(".", 1)[-1]: k for k in _all_keys() if k.startswith(loc.rsplit(".", 1)[0])}
            hit = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.5)
            close = [leaves[hit[0]]] if hit else []
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown config key '{loc}'{hint}"
    value = first.get("input")
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if not loc:  # a cross-field check: the message already names the keys
        return f"invalid config: {msg}"
    if isinstance(value, dict):
        return f"config key '{loc}': {msg}"
    return f"config key '{loc}' = {value!r}: {msg}"


def split_config_and_overrides(first: str | None, rest: list[str]) -> tuple[str | None, list[str]]:
    """A command line's config name (a preset or YAML file) and its ``key.sub=value`` overrides,
    from argparse's optional config positional ``first`` and the words after it: argparse cannot
    tell ``digits`` from ``seed=1`` positionally.

    Overrides may come before or after the config name (``run seed=1 digits`` or ``run digits
    seed=1``); the one word without ``=`` is the config. Two such words are an error.
    """
    words = ([first] if first is not None else []) + list(rest)
    configs = [w for w in words if "=" not in w]
    if len(configs) > 1:
        raise PddError(f"two configs given ({configs[0]!r} and {configs[1]!r}); pass one preset or YAML file, "
                       "then key.sub=value overrides")
    return (configs[0] if configs else None), [w for w in words if "=" in w]


def split_override(item: str, form: str = "key.sub=value (e.g. distill.ipc_per_stage=4)") -> tuple[str, str]:
    """``"key=value"`` -> (key, raw value); anything else is a one-line error naming ``form``."""
    if "=" not in item:
        raise PddError(f"override '{item}' is not of the form {form}")
    key, raw = item.split("=", 1)
    return key, raw


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["distill.ipc_per_stage=4", "seed=1"]`` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, raw = split_override(item)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise PddError(f"override '{item}' has an empty key; use key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PddError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_preset(name_or_path: str) -> Path:
    """A path to a YAML file, or a preset name such as ``digits`` or ``cifar10_ipc10``."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    for candidate in (PRESET_DIR / f"{name_or_path}.yaml", PRESET_DIR / name_or_path):
        if candidate.is_file():
            return candidate
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
    close = difflib.get_close_matches(name_or_path, presets, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise PddError(
        f"config '{name_or_path}' is neither a YAML file nor a preset{hint}; presets: {', '.join(presets) or 'none found'}"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML mapping, with a one-line error for syntax problems."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise PddError(f"config file {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise PddError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def build_config(data: dict[str, Any]) -> PddConfig:
    """Validate a nested dict into a :class:`PddConfig`, or raise a one-line :class:`PddError`."""
    try:
        return PddConfig.model_validate(data)
    except ValidationError as err:
        raise PddError(_format_validation_error(err, data)) from None


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> PddConfig:
    """Load a preset or YAML file (default: the digits preset) and apply ``key=value`` overrides."""
    path = resolve_preset(name_or_path or "digits")
    extra = parse_overrides(list(overrides or []))
    if "method" in extra and isinstance(extra.get("distill", {}), dict) and "method" not in extra.get("distill", {}):
        # ``method=dm`` overrides the preset's ``distill.method`` (a clash among the overrides still fails)
        extra = {**extra, "distill": {**extra.get("distill", {}), "method": extra["method"]}}
        del extra["method"]
    base = read_yaml(path)
    data = _merge(base, extra)
    overridden = (extra.get("data") or {}).get("dataset") if isinstance(extra.get("data"), dict) else None
    if "name" not in extra and overridden is not None and overridden != _dataset_of(base):
        data["name"] = dataset_run_name(data)  # not digits-<key> for a run on someone's own images
    return build_config(data)


def _dataset_of(data: dict[str, Any]) -> str:
    """The dataset a config file names (the default when it names none)."""
    section = data.get("data")
    default = DataConfig.model_fields["dataset"].default
    return section.get("dataset", default) if isinstance(section, dict) else default


def dataset_run_name(data: dict[str, Any]) -> str:
    """A run name from the dataset, for presets whose dataset was overridden: the dataset's name,
    or for ``imagefolder`` the root folder's name (``~/data/flowers`` -> ``flowers``)."""
    import re

    section = data.get("data") or {}
    name = str(section.get("dataset"))
    root = section.get("root")
    if name == "imagefolder" and root:
        name = Path(str(root)).expanduser().name or name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"


def dump_config(config: PddConfig) -> str:
    """The resolved config as YAML (saved next to every result so a run can be repeated)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

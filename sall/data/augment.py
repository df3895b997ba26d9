"""The paper's augmentations, drawn per image and applied to a whole batch on its device.

Scale +-10 %, rotation by a multiple of 90 degrees, horizontal/vertical flips and skew (shear)
+-0.2, composed into one affine matrix per image and applied with a single `grid_sample`, so the
same code runs on a GPU batch without a per-image Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_affine(n: int, generator: torch.Generator, scale: float = 0.1, skew: float = 0.2) -> torch.Tensor:
    """(n, 2, 3) affine matrices for `F.affine_grid`: rot90 * flip * scale * shear."""
    u = torch.rand(n, 4, generator=generator)
    k = torch.randint(0, 4, (n,), generator=generator)
    flip = torch.randint(0, 2, (n, 2), generator=generator).float() * 2 - 1
    s = 1.0 + (u[:, 0] * 2 - 1) * scale
    sh = (u[:, 1] * 2 - 1) * skew
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[k]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[k]
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (n,2,2)
    shear = torch.zeros(n, 2, 2)
    shear[:, 0, 0] = 1.0 / s
    shear[:, 0, 1] = sh
    shear[:, 1, 1] = 1.0 / s
    fl = torch.diag_embed(flip)
    m = rot @ fl @ shear
    return torch.cat([m, torch.zeros(n, 2, 1)], dim=2)


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply a random paper augmentation to each image of a float NCHW batch."""
    theta = random_affine(x.shape[0], generator).to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_float(x_uint8_nhwc: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return x_uint8_nhwc.permute(0, 3, 1, 2).to(dtype).div_(255.0)

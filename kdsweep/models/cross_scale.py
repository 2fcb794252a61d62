"""Li et al.'s cross-scale student: a deconvolution that upsamples the student's feature maps.

Reference:
    Li, Jin & Yan, "Mimicking Very Efficient Network for Object Detection", CVPR 2017 (section
    3.4, cross-scale mimic): the student sees the image at half the teacher's resolution and "a
    deconvolution layer on top of its final feature map" upsamples it to the teacher's map size.
    The deconvolution is part of the student's network: it runs at inference ("only a small extra
    time cost, 3.5 ms") and the paper's table has a "deconvolution only" row (no mimic).

Two uses:

* :class:`UpsampledBackbone`: a torchvision ``BackboneWithFPN`` whose every FPN map goes through a
  :class:`Deconv`, built into the student by ``ModelConfig.upsample`` (the paper's form: the
  detection heads run on the upsampled maps, in training and at inference);
* :class:`Deconv` alone: the training-only adapter of ``mimic``'s ``deconv: true`` option (the
  student's heads keep its coarse maps), kept as a named alternative.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict

import torch
from torch import Tensor, nn

__all__ = ["Deconv", "UpsampledBackbone", "feature_upsample"]


def feature_upsample(model: nn.Module | None) -> int:
    """How much finer a detector's maps are than its backbone's strides: ``upsample`` of an
    :class:`UpsampledBackbone`, else 1."""
    return int(getattr(getattr(model, "backbone", None), "factor", 1))


class Deconv(nn.Sequential):
    """``log2(scale)`` ConvTranspose2d(kernel 4, stride 2, padding 1) layers, no activation.

    Each layer doubles the map exactly (``(H-1)*2 - 2 + 4 = 2H``); the first maps
    ``in_channels -> out_channels``, the others keep ``out_channels``. ``bilinear=True`` (equal
    widths only) starts every layer as per-channel bilinear upsampling (weights of FCN's
    ``upsample_filt``, zero bias), so that a student trained from scratch starts from its own maps
    upsampled; otherwise PyTorch's default initialisation.

    Shape: (N, in_channels, H, W) -> (N, out_channels, scale*H, scale*W).
    """

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2, bilinear: bool = False) -> None:
        if scale < 2 or scale & (scale - 1):
            raise ValueError(f"Deconv: scale {scale} must be a power of 2 >= 2")
        if bilinear and in_channels != out_channels:
            raise ValueError("Deconv: bilinear initialisation needs equal widths")
        steps = int(math.log2(scale))
        super().__init__(*(
            nn.ConvTranspose2d(in_channels if i == 0 else out_channels, out_channels, kernel_size=4, stride=2, padding=1)
            for i in range(steps)
        ))
        self.scale = scale
        if bilinear:
            kernel = torch.tensor([0.25, 0.75, 0.75, 0.25])  # FCN's upsample_filt(4): 1 - |x - c| / f
            for layer in self:
                with torch.no_grad():
                    layer.weight.zero_()
                    for c in range(out_channels):
                        layer.weight[c, c] = kernel[:, None] * kernel[None, :]
                    layer.bias.zero_()


class UpsampledBackbone(nn.Module):
    """``body`` -> ``fpn`` -> one :class:`Deconv` per FPN map (``upsample`` x, bilinear start).

    The same ``body`` / ``fpn`` submodules (and state-dict names) as torchvision's
    ``BackboneWithFPN``, plus ``upsample`` (a ``ModuleDict`` by map name), so hooks on
    ``backbone`` see the upsampled maps and hooks on ``backbone.body`` the last stage as before.
    A detector built on it computes its anchors' strides and its RoI pooling scales from the map
    sizes, so the heads work on the finer maps unchanged; ``build_detector`` divides the anchor
    sizes by ``upsample`` so that anchors keep their size relative to the stride.

    Shape: image batch (N, 3, H, W) -> maps ``(N, C, upsample * H / s_k, upsample * W / s_k)``.
    """

    def __init__(self, backbone: nn.Module, upsample: int, names: list[str]) -> None:
        super().__init__()
        self.body = backbone.body
        self.fpn = backbone.fpn
        self.out_channels = backbone.out_channels
        self.factor = upsample
        c = backbone.out_channels
        self.upsample = nn.ModuleDict({name: Deconv(c, c, upsample, bilinear=True) for name in names})

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        maps = self.fpn(self.body(x))
        out = OrderedDict()  # in the FPN's order: ``upsample`` was built from its keys
        for name, deconv in self.upsample.items():  # TorchScript indexes a ModuleDict only this way
            out[name] = deconv(maps[name])
        return out

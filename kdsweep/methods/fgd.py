"""Focal and global distillation (registry key ``fgd``).

Reference:
    Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022. On every FPN
    level the student imitates the teacher separately on the foreground (inside ground-truth
    boxes) and the background, both weighted by the teacher's spatial and channel attention
    (focal distillation, Eq. 1-6 of the paper), imitates the attention itself (Eq. 7), and matches
    the teacher's global relation between pixels through a GcBlock (Eq. 8-10). COCO, RetinaNet
    ResNeXt101 -> R50 (2x): 37.4 -> 40.7 AP, with ``T = 0.5``, ``alpha = 1e-3``, ``beta = 5e-4``,
    ``gamma = 5e-4``, ``lambda = 5e-6`` (the paper's RetinaNet setting, :data:`FGD_RETINANET`).

One level, student ``S`` (after the 1x1 adapter) and teacher ``T``, both ``(N, C, H, W)``:

* **Masks** (Eq. 1-2), per image from its boxes mapped onto the level's grid by the level's stride
  (``floor`` of the low corner, ``ceil`` of the high one, rows ``hmin..hmax`` inclusive, as the
  authors' code): ``M_fg = 1 / (h_box * w_box)`` inside a box (in cells; the larger value where
  boxes overlap, so small boxes weigh as much as large ones), ``M_bg = 1[M_fg = 0] / sum 1[M_fg = 0]``.
* **Attention** (Eq. 3-4): ``A^S = H W softmax_hw(mean_c |F| / T)`` and
  ``A^C = C softmax_c(mean_hw |F| / T)``, of the teacher for the focal loss.
* **Focal loss** (Eq. 5): ``L_fg = (1/N) sum M_fg A^S_t A^C_t (S - T)^2`` and ``L_bg`` alike with
  ``M_bg``; the term returns ``alpha L_fg`` and ``beta L_bg``.
* **Attention loss** (Eq. 7): ``gamma ((1/N) sum |A^C_s - A^C_t| + (1/N) sum |A^S_s - A^S_t|)``.
* **Global loss** (Eq. 9-10): ``lambda (1/N) sum (GC_s(S) - GC_t(T))^2`` with
  ``GC(F) = F + W_v2 ReLU(LN(W_v1 sum_j softmax_j(W_k F_j) F_j))``, a GcBlock of its own for each
  side (both trained with the student; their last conv starts at 0, so ``GC(F) = F`` at first).

The parts are returned by name (``fg``, ``bg``, ``attention``, ``global``) already multiplied by
their coefficients: the entry's ``weight`` (default 1) scales them all, as the paper's total
``L = L_det + alpha L_fg + beta L_bg + gamma L_at + lambda L_global``.

Deviation: the authors map a box onto the grid by ``x / img_w * W`` with the unpadded image width
and the padded map width, which shifts boxes in padded images of a batch; here ``x / stride``,
the same on unpadded maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsweep.config import ConfigError
from kdsweep.kd.adapters import level_adapters
from kdsweep.kd.step import KDStep
from kdsweep.kd.term import KDTerm, Need, TermSpec, reject_unknown
from kdsweep.models.detectors import level_strides

__all__ = ["FGD_RETINANET", "FGDTerm", "GcBlock", "attention", "build_fgd", "focal_masks"]

FGD_RETINANET: dict[str, float] = {"temperature": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lam": 5e-6}
"""The paper's RetinaNet coefficients (its Table 9 / the authors' RetinaNet config)."""


def focal_masks(boxes: Sequence[Tensor], height: int, width: int, stride: float) -> tuple[Tensor, Tensor]:
    """FGD's foreground and background masks of one level (Eq. 1-2, see the module docstring).

    Args:
        boxes: per image ``(B_i, 4)`` xyxy in the network's input coordinates.
        height, width: the level's map size; stride: input pixels per cell.

    Returns:
        ``(M_fg, M_bg)``, each ``(N, H, W)``; ``M_bg`` of an image sums to 1 unless it has no
        background cell (then 0).
    """
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    fg = torch.zeros(len(boxes), height, width, device=device)
    for i, b in enumerate(boxes):
        if b.numel() == 0:
            continue
        b = b.detach().float() / stride
        wmin, hmin = b[:, 0].floor(), b[:, 1].floor()
        wmax, hmax = b[:, 2].ceil(), b[:, 3].ceil()
        area = 1.0 / ((hmax + 1 - hmin) * (wmax + 1 - wmin))  # cells of the inclusive ranges, as the authors
        inside = ((rows[None, :, None] >= hmin[:, None, None]) & (rows[None, :, None] <= hmax[:, None, None])
                  & (cols[None, None, :] >= wmin[:, None, None]) & (cols[None, None, :] <= wmax[:, None, None]))
        fg[i] = (inside * area[:, None, None]).amax(dim=0)
    bg = (fg == 0).float()
    total = bg.sum(dim=(1, 2), keepdim=True)
    bg = torch.where(total > 0, bg / total.clamp_min(1), bg)
    return fg, bg


def attention(x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """FGD's spatial and channel attention of a map (Eq. 3-4).

    Shape:
        - x: ``(N, C, H, W)``; output: spatial ``(N, H, W)`` (sums to ``H W`` per image) and
          channel ``(N, C)`` (sums to ``C``).
    """
    n, c, h, w = x.shape
    value = x.abs()
    spatial = h * w * F.softmax((value.mean(dim=1) / temperature).flatten(1), dim=1).view(n, h, w)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial, channel


class GcBlock(nn.Module):
    """The global-context block of FGD's relation loss (Cao et al.'s GCNet, FGD Eq. 9).

    ``GC(F) = F + conv2(ReLU(LN(conv1(context))))``, ``context = sum_j softmax_j(conv_k F)_j F_j``.
    ``conv_k`` starts with Kaiming (fan-in) weights, ``conv2`` at zero (the authors' initialisation).

    Shape: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 2, 1)
        self.key = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(nn.Conv2d(channels, hidden, kernel_size=1), nn.LayerNorm([hidden, 1, 1]),
                                       nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, kernel_size=1))
        nn.init.kaiming_normal_(self.key.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.key.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        weights = F.softmax(self.key(x).view(n, 1, h * w), dim=2)  # (N, 1, HW)
        context = torch.bmm(x.view(n, c, h * w), weights.transpose(1, 2)).view(n, c, 1, 1)
        return x + self.transform(context)


class FGDTerm(KDTerm):
    """``fgd`` on the term's levels (see the module docstring for the maths).

    Args:
        student_channels, teacher_channels, num_levels, adapter: as the feature terms.
        strides: input pixels per cell of each level (student order).
        temperature, alpha, beta, gamma, lam: the paper's ``T``, ``alpha``, ``beta``, ``gamma``,
            ``lambda`` (default :data:`FGD_RETINANET`).

    Shape:
        - forward: ``step.aligned()`` maps and ``step.targets``' boxes; output: the parts
          ``{"fg", "bg", "attention", "global"}``, each ``()``, summed over levels.
    """

    needs = frozenset({Need.TARGETS})

    def __init__(self, *, student_channels: int, teacher_channels: int, num_levels: int, strides: Sequence[float],
                 adapter: bool | str = False, name: str = "fgd", temperature: float = FGD_RETINANET["temperature"],
                 alpha: float = FGD_RETINANET["alpha"], beta: float = FGD_RETINANET["beta"],
                 gamma: float = FGD_RETINANET["gamma"], lam: float = FGD_RETINANET["lam"]) -> None:
        super().__init__()
        for key, value in (("temperature", temperature), ("alpha", alpha), ("beta", beta), ("gamma", gamma),
                           ("lam", lam)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"kd.{name}.params.{key} must be a number, got {value!r}")
            if value < 0:
                raise ConfigError(f"kd.{name}.params.{key} must be >= 0, got {value!r}")
        if not temperature > 0:
            raise ConfigError(f"kd.{name}.params.temperature must be > 0, got {temperature!r} (the paper's T: 0.5)")
        if len(strides) != num_levels:
            raise ValueError(f"kd.{name}: {num_levels} levels but {len(strides)} strides")
        self.name = name
        self.strides = tuple(float(s) for s in strides)
        self.temperature, self.alpha, self.beta, self.gamma, self.lam = temperature, alpha, beta, gamma, lam
        self.adapters = level_adapters(name, student_channels, teacher_channels, num_levels, adapter)
        self.student_gc = nn.ModuleList(GcBlock(teacher_channels) for _ in range(num_levels))
        self.teacher_gc = nn.ModuleList(GcBlock(teacher_channels) for _ in range(num_levels))

    def forward(self, step: KDStep) -> dict[str, Tensor]:
        if step.targets is None:
            raise RuntimeError(f"kd.{self.name}: the student's targets were not captured")
        return self.compare(*step.aligned(), [t["boxes"] for t in step.targets])

    def compare(self, student: Sequence[Tensor], teacher: Sequence[Tensor], boxes: Sequence[Tensor]) -> dict[str, Tensor]:
        """The parts of matched level lists and per-image boxes (input coordinates)."""
        if len(student) != len(self.strides) or len(teacher) != len(self.strides):
            raise ValueError(f"kd.{self.name}: expected {len(self.strides)} levels, got {len(student)} student "
                             f"and {len(teacher)} teacher maps")
        parts: dict[str, Tensor] = {}
        for level, (s, t) in enumerate(zip(student, teacher)):
            if self.adapters is not None:
                s = self.adapters[level](s)
            t = t.detach().to(s.dtype)
            n, _, h, w = s.shape
            fg, bg = focal_masks(boxes, h, w, self.strides[level])
            spatial_t, channel_t = attention(t, self.temperature)
            spatial_s, channel_s = attention(s, self.temperature)
            weight = spatial_t[:, None] * channel_t[:, :, None, None]  # (N, C, H, W), no gradient
            sq = (s - t).pow(2) * weight
            level_parts = {
                "fg": self.alpha * (sq * fg[:, None]).sum() / n,
                "bg": self.beta * (sq * bg[:, None]).sum() / n,
                "attention": self.gamma * ((channel_s - channel_t).abs().sum() / n
                                           + (spatial_s - spatial_t).abs().sum() / n),
                "global": self.lam * (self.student_gc[level](s) - self.teacher_gc[level](t)).pow(2).sum() / n,
            }
            for key, value in level_parts.items():
                parts[key] = parts[key] + value if key in parts else value
        return parts

    def extra_repr(self) -> str:
        return (f"levels={len(self.strides)}, T={self.temperature}, alpha={self.alpha}, beta={self.beta}, "
                f"gamma={self.gamma}, lambda={self.lam}")


def build_fgd(spec: TermSpec) -> FGDTerm:
    """Registry builder: ``params: {temperature, alpha, beta, gamma, lam}`` (default :data:`FGD_RETINANET`)."""
    params: dict[str, Any] = dict(spec.params)
    reject_unknown(spec.name, params, list(FGD_RETINANET))
    return FGDTerm(student_channels=spec.student_channels, teacher_channels=spec.teacher_channels,
                   num_levels=spec.num_levels, strides=[level_strides(spec.student)[lv] for lv in spec.levels], adapter=spec.adapter,
                   name=spec.name, **params)


"""Feature-map mimicking (Li, Jin, Yan, CVPR 2017) on the kdsweep path: ``mimic``, ``mimic_full``,
``mimic_logits`` and ``mimic_head`` (registry keys), plus the cross-scale deconvolution adapter.

Reference:
    Li, Jin, Yan, "Mimicking Very Efficient Network for Object Detection", CVPR 2017; see
    ``/work/shared/METHODS.md`` section 1. The student mimics the teacher's *feature map* inside
    sampled regions; whole-map regression and logits matching are the paper's failing baselines.

All four are KD terms (:mod:`kdsweep.kd.term`) that read more of the step than matched maps (their
``needs``): ``forward(step)`` gets the step's :class:`~kdsweep.kd.step.KDStep`. Teacher tensors are always detached and the teacher's own
modules run under ``no_grad``, so gradients reach only the student and the terms' adapters.

* ``mimic`` (:class:`MimicTerm`): proposal-sampled feature mimicking,
  ``L_m = 1/(2R) * sum_i (1/m_i) * ||u_i - r(v_i)||^2`` (:func:`region_mimic_loss`), with ``R``
  the regions of the whole batch, ``m_i = C * h_i * w_i`` the values in region ``i`` and ``r`` the
  adapter (a 1x1 conv, or :class:`DeconvAdapter` for cross-scale mimic), applied to the whole
  student map before cropping (a 1x1 conv commutes with cropping). Regions:

  - two-stage students (``step.proposals`` is set): :func:`sample_rois` on the student's RPN
    proposals, ``num_rois`` per image (128) with ``positive_fraction`` (0.5, i.e. 1:1) positives
    at IoU >= ``iou_threshold`` (0.5) with a ground-truth box, GT boxes added to the positive
    candidates, negatives filling in when positives are short (as torchvision's ``roi_heads``);
  - one-stage students (no RPN): :func:`one_stage_regions`, the ground-truth boxes plus random
    background boxes (IoU < 0.3 with every GT box) in the ratio ``positive_fraction`` sets.
    *Choice*: a one-stage student proposes nothing, so the GT boxes stand in for the positive
    proposals and random boxes for the negative ones.

  Boxes are in the student's input coordinates (``step.targets``); a box is cut from level ``pk``
  in feature cells ``box / 2**k``. Level of each region (``assign``): ``"fpn"`` (default) the FPN
  paper's rule as torchvision's ``LevelMapper`` (``k = floor(4 + log2(sqrt(area) / 224))``,
  clamped to the term's levels and snapped to the nearest configured one), so each region is
  mimicked once, where an R-CNN head would pool it, and the ``1/(2R)`` normalisation is the
  paper's; ``"all"``: every region on every configured level, the per-level losses averaged.
  ``pooled: k`` switches to the RoIAlign variant (fixed ``k x k`` crops).
* ``mimic_full`` (:class:`FullMapMimicTerm`): whole-map L2 regression, ``0.5 * MSE`` per level
  (mean over the level's ``N*C*H*W`` values), summed over levels.
* ``mimic_logits`` (:class:`LogitsMimicTerm`): L2 between the dense outputs of student and
  teacher heads, the teacher's head run on the teacher's FPN maps resized to the student's map
  sizes (so both predict on the same anchors). One-stage (RetinaNet, FCOS): every output of the
  head (``cls_logits``, ``bbox_regression``, FCOS's ``bbox_ctrness``). *Choice* for Faster
  R-CNN: its dense outputs, the RPN's objectness logits and box deltas (the student's RPN head is
  re-run on its own maps; R-CNN outputs are ``mimic_head``'s job).
* ``mimic_head`` (:class:`HeadMimicTerm`): the two-stage mimic; on proposals sampled as ``mimic``
  does, the student's R-CNN head (``box_roi_pool`` -> ``box_head`` -> ``box_predictor``) on its
  maps and the teacher's on the teacher's maps with the same proposals mapped into the teacher's
  input coordinates; L2 between class logits and between box-regression outputs. Only the head
  part: list ``mimic`` too for the paper's full two-stage mimic (each term samples its own
  proposals from the same distribution).
* Cross-scale mimic, the paper's form: the student sees the image at half the teacher's
  resolution (``student_scale: 0.5``, ``teacher_scale: 2``) and its own deconvolution
  (``student.upsample: 2``, :mod:`kdsweep.models.cross_scale`) upsamples its FPN maps, in training
  and at inference: the heads detect on the finer maps, and the parameters and speed columns
  count it. Its maps are then the teacher's size; regions are cut in cells of ``2**k / 2``
  student input pixels. A 1x1 ``adapter`` maps the channels when the widths differ.
* Cross-scale mimic, training-only alternative (``deconv: true`` on ``mimic`` / ``mimic_full``):
  a :class:`DeconvAdapter` per level upsamples the student map to the teacher's map size for the
  loss only (the student's heads keep its coarse maps), and the teacher map is used at its own
  resolution (cropped/padded at the bottom/right to exactly ``deconv_scale`` x the student's size,
  as :func:`kdsweep.models.taps._crop_or_pad`) instead of being resized down. Regions are then cut
  in teacher-map cells (stride ``2**k / deconv_scale``). The deconvolution maps channels too, so
  ``adapter`` is not needed (and not used) with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, roi_align
from torchvision.ops.poolers import LevelMapper

from kdsweep.config import ConfigError
from kdsweep.kd.adapters import check_widths, level_adapters
from kdsweep.kd.step import KDStep, roi_levels
from kdsweep.kd.term import KDTerm, Need, TermSpec, reject_unknown
from kdsweep.models.cross_scale import Deconv, feature_upsample
from kdsweep.models.detectors import level_names
from kdsweep.models.taps import _crop_or_pad

__all__ = [
    "BACKGROUND_IOU",
    "DeconvAdapter",
    "FullMapMimicTerm",
    "HeadMimicTerm",
    "LogitsMimicTerm",
    "MimicTerm",
    "assign_levels",
    "boxes_to_rois",
    "build_mimic",
    "build_mimic_full",
    "build_mimic_head",
    "build_mimic_logits",
    "one_stage_regions",
    "region_errors",
    "region_mimic_loss",
    "sample_rois",
]

BACKGROUND_IOU = 0.3  # one-stage background boxes overlap every GT box less than this
CANONICAL_SCALE, CANONICAL_LEVEL = 224, 4  # FPN's level-assignment rule (torchvision's LevelMapper)


# ------------------------------------------------------------------------------- region losses
def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image boxes ``[(n_i, 4)]`` -> ``(sum n_i, 5)`` rows ``[batch_idx, x0, y0, x1, y1]``."""
    if not boxes:
        return torch.zeros(0, 5)
    rows = [torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device), b], 1) for i, b in enumerate(boxes)]
    return torch.cat(rows, 0)


def _check_rois(student_map: Tensor, teacher_map: Tensor, rois: Tensor) -> None:
    if student_map.dim() != 4 or student_map.shape != teacher_map.shape:
        raise ValueError(
            f"region_mimic_loss: student {tuple(student_map.shape)} and teacher {tuple(teacher_map.shape)} "
            "must be equal (N, C, H, W) maps (apply the adapter and align resolution first)"
        )
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"region_mimic_loss: rois must be (R, 5) [batch_idx, x0, y0, x1, y1], got {tuple(rois.shape)}")


def region_errors(student_map: Tensor, teacher_map: Tensor, rois: Tensor, *, pooled: int | None = None) -> Tensor:
    """Per-region normalised squared errors ``(1/m_i) * ||u_i - v_i||^2``, shape ``(R,)``.

    See :func:`region_mimic_loss` (which is ``region_errors(...).sum() / (2R)``). Computed in
    float32 (the integral image in float64), whatever the maps' dtype.
    """
    _check_rois(student_map, teacher_map, rois)
    if rois.shape[0] == 0:
        return student_map.new_zeros(0, dtype=torch.float32)
    s, t = student_map.float(), teacher_map.float()
    rois = rois.to(device=s.device, dtype=torch.float32)
    if pooled is not None:
        if pooled < 1:
            raise ValueError(f"region_mimic_loss: pooled {pooled} must be >= 1")
        u = roi_align(s, rois, output_size=pooled, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        v = roi_align(t, rois, output_size=pooled, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        return (u - v).pow(2).flatten(1).mean(1)
    n, c, h, w = s.shape
    diff = (s - t).pow(2).sum(1)  # D: (N, H, W), channel-summed squared difference
    integral = F.pad(diff.double().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (N, H+1, W+1), I[y, x] = sum D[:y, :x]
    b = rois[:, 0].long().clamp(0, n - 1)
    x0 = rois[:, 1].floor().long().clamp(0, w - 1)
    y0 = rois[:, 2].floor().long().clamp(0, h - 1)
    x1 = torch.maximum(rois[:, 3].ceil().long().clamp(max=w), x0 + 1)  # at least one cell
    y1 = torch.maximum(rois[:, 4].ceil().long().clamp(max=h), y0 + 1)
    sums = integral[b, y1, x1] - integral[b, y0, x1] - integral[b, y1, x0] + integral[b, y0, x0]
    values = c * (y1 - y0) * (x1 - x0)  # m_i
    return (sums / values).float()


def region_mimic_loss(student_map: Tensor, teacher_map: Tensor, rois: Tensor, *, pooled: int | None = None) -> Tensor:
    r"""Li et al.'s normalised region mimic loss :math:`\frac{1}{2R}\sum_i \frac{1}{m_i}\|u_i - v_i\|_2^2`.

    Region ``i`` (row ``[b, x0, y0, x1, y1]`` in feature-map cells, cell ``j`` covering
    ``[j, j+1)``) covers the integer cells ``floor(x0) .. ceil(x1) - 1`` by
    ``floor(y0) .. ceil(y1) - 1`` of image ``b`` (every cell the box touches), clamped to the map
    and never fewer than one cell; ``u_i``, ``v_i`` are the student's and the teacher's values
    there (``m_i = C * h_i * w_i`` of them). No loop per region: the channel-summed squared
    difference ``D`` (N, H, W) is computed once, then its 2-D integral image (zero padded
    cumulative sums), and each region's sum is 4 look-ups.

    ``pooled=k``: the RoIAlign variant. Both maps are pooled on the same rois
    (``torchvision.ops.roi_align``, ``aligned=True``, ``k x k`` output, adaptive sampling) and
    region ``i`` contributes the mean over its ``C*k*k`` squared differences; the sum is divided
    by ``2R`` as above.

    Args:
        student_map: (N, C, H, W), already through the adapter; keeps its graph.
        teacher_map: (N, C, H, W); the caller detaches it.
        rois: (R, 5) float ``[batch_idx, x0, y0, x1, y1]`` in feature-map cells.
        pooled: None (regions at their own size, the paper's final version) or ``k >= 1``.
    Returns:
        A float32 scalar; 0 (still attached to ``student_map``) when ``R == 0``.
    """
    errors = region_errors(student_map, teacher_map, rois, pooled=pooled)
    if errors.numel() == 0:
        return student_map.sum().float() * 0.0
    return errors.sum() / (2 * errors.numel())


# -------------------------------------------------------------------------------- region sampling
def _randperm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    if generator is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def sample_rois(
    proposals: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    *,
    num: int = 128,
    positive_fraction: float = 0.5,
    iou_threshold: float = 0.5,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Sample ``num`` regions per image from RPN proposals, balanced as torchvision's R-CNN head.

    Per image the candidates are the proposals plus the GT boxes themselves (as torchvision's
    ``roi_heads.add_gt_proposals``); a candidate is positive when its best IoU with a GT box is
    ``>= iou_threshold``, else negative (every candidate is negative when the image has no GT).
    Up to ``int(num * positive_fraction)`` positives are drawn at random, negatives fill the rest
    up to ``num`` (fewer when there are not enough), exactly the rule of torchvision's
    ``BalancedPositiveNegativeSampler`` (reimplemented here to take a ``generator``).

    Args:
        proposals: per image (P_i, 4) xyxy boxes (detached here).
        gt_boxes: per image (G_i, 4) xyxy boxes, same coordinates.
        generator: a torch.Generator (its device's RNG) for reproducible draws; None: global RNG.
    Returns:
        Per image (n_i, 4) boxes, positives first, ``n_i <= num``.
    """
    if len(proposals) != len(gt_boxes):
        raise ValueError(f"sample_rois: {len(proposals)} proposal sets for {len(gt_boxes)} images")
    out = []
    for props, gt in zip(proposals, gt_boxes):
        props = props.detach()
        gt = gt.detach().to(device=props.device, dtype=props.dtype).reshape(-1, 4)
        cands = torch.cat([props.reshape(-1, 4), gt], 0)
        if gt.numel():
            positive = box_iou(cands, gt).max(1).values >= iou_threshold
        else:
            positive = torch.zeros(len(cands), dtype=torch.bool, device=cands.device)
        pos = torch.where(positive)[0]
        neg = torch.where(~positive)[0]
        num_pos = min(int(num * positive_fraction), pos.numel())
        num_neg = min(num - num_pos, neg.numel())
        pos = pos[_randperm(pos.numel(), generator, cands.device)[:num_pos]]
        neg = neg[_randperm(neg.numel(), generator, cands.device)[:num_neg]]
        out.append(cands[torch.cat([pos, neg])])
    return out


def _rand(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, device=generator.device if generator is not None else "cpu")


def _background_boxes(gt: Tensor, size: tuple[int, int], count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` random boxes inside ``size`` = (h, w) with IoU < 0.3 with every box of ``gt``.

    Width and height are log-uniform in ``[side/16, side/2]`` of the image side (at least 1 px),
    the position uniform inside the image. Rejection sampling, batched: up to 20 rounds of
    ``4 * count + 16`` candidates; fewer boxes come back if the GT boxes leave too little room.
    """
    h, w = float(size[0]), float(size[1])
    found: list[Tensor] = []
    have = 0
    gt_cpu = gt.detach().float().cpu().reshape(-1, 4)
    for _ in range(20):
        if have >= count:
            break
        m = 4 * count + 16
        lo_w, hi_w, lo_h, hi_h = max(1.0, w / 16), max(1.0, w / 2), max(1.0, h / 16), max(1.0, h / 2)
        bw = torch.exp(math.log(lo_w) + _rand(m, generator).cpu() * math.log(hi_w / lo_w))
        bh = torch.exp(math.log(lo_h) + _rand(m, generator).cpu() * math.log(hi_h / lo_h))
        bw, bh = bw.clamp(max=w), bh.clamp(max=h)
        x0 = _rand(m, generator).cpu() * (w - bw)
        y0 = _rand(m, generator).cpu() * (h - bh)
        boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], 1)
        if gt_cpu.numel():
            boxes = boxes[box_iou(boxes, gt_cpu).max(1).values < BACKGROUND_IOU]
        found.append(boxes[: count - have])
        have += len(found[-1])
    return torch.cat(found, 0) if found else torch.zeros(0, 4)


def one_stage_regions(
    gt_boxes: Sequence[Tensor],
    image_size: tuple[int, int] | Sequence[tuple[int, int]],
    *,
    num: int = 128,
    positive_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Mimic regions of a student without an RPN: GT boxes plus random background boxes.

    *Choice* (documented in the module): per image, the positives are the GT boxes (a random
    ``int(num * positive_fraction)`` of them when there are more); background boxes (random size
    and position, IoU < :data:`BACKGROUND_IOU` = 0.3 with every GT box, see
    :func:`_background_boxes`) keep the positive:negative ratio of ``positive_fraction``
    (``ceil(G * (1 - f) / f)``, 1:1 by default, capped so that the image has at most ``num``
    regions); an image without GT gets ``round(num * (1 - f))`` background boxes (at least one
    unless ``f == 1``).

    Args:
        gt_boxes: per image (G_i, 4) xyxy boxes in input coordinates.
        image_size: (h, w) of every image, or one (h, w) per image (e.g. ``step.image_sizes``).
        generator: a torch.Generator for reproducible draws; None: global RNG.
    Returns:
        Per image (n_i, 4) boxes on the GT boxes' device and dtype: the kept GT boxes first.
    """
    if len(image_size) == 2 and all(isinstance(v, (int, float)) for v in image_size):
        sizes = [tuple(image_size)] * len(gt_boxes)  # type: ignore[list-item]
    else:
        sizes = [tuple(s) for s in image_size]  # type: ignore[union-attr]
    if len(sizes) != len(gt_boxes):
        raise ValueError(f"one_stage_regions: {len(sizes)} image sizes for {len(gt_boxes)} images")
    out = []
    for gt, size in zip(gt_boxes, sizes):
        gt = gt.detach().reshape(-1, 4)
        keep = int(num * positive_fraction)
        if len(gt) > keep:
            gt = gt[_randperm(len(gt), generator, gt.device)[:keep]]
        if len(gt):
            count = min(num - len(gt), math.ceil(len(gt) * (1 - positive_fraction) / positive_fraction - 1e-9))
        else:
            count = max(round(num * (1 - positive_fraction)), 1 if positive_fraction < 1 else 0)
        background = _background_boxes(gt, size, count, generator) if count > 0 else torch.zeros(0, 4)
        out.append(torch.cat([gt, background.to(device=gt.device, dtype=gt.dtype)], 0))
    return out


def assign_levels(boxes: Tensor, levels: Sequence[str]) -> Tensor:
    """Index into ``levels`` (canonical ``p<k>``) of each (R, 4) box, by FPN's assignment rule.

    torchvision's ``LevelMapper`` (``k = floor(4 + log2(sqrt(area) / 224) + 1e-6)``, clamped to
    ``[min k, max k]`` of ``levels``), then snapped to the nearest configured level (the lower one
    on a tie) when ``levels`` skips some.
    """
    ks = torch.tensor([_level_k(lv) for lv in levels], device=boxes.device)
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    k_min, k_max = int(ks.min()), int(ks.max())
    mapper = LevelMapper(k_min, k_max, canonical_scale=CANONICAL_SCALE, canonical_level=CANONICAL_LEVEL)
    k = mapper([boxes.float()]) + k_min  # (R,)
    return (k[:, None] - ks[None, :]).abs().argmin(1)


def _level_k(level: str) -> int:
    if not (level.startswith("p") and level[1:].isdigit()):
        raise ValueError(f"level '{level}' is not a canonical level name p<k>")
    return int(level[1:])


def _step_gt(step: KDStep, name: str) -> list[Tensor]:
    if step.targets is None:
        raise RuntimeError(f"kd.{name}: the student's transformed targets were not captured")
    return [t["boxes"].detach() for t in step.targets]


def _zero_on(tensors: Sequence[Tensor]) -> Tensor:
    """A float32 zero attached to every tensor's graph (every adapter takes part in every step)."""
    total = None
    for x in tensors:
        z = x.sum().float() * 0.0
        total = z if total is None else total + z
    assert total is not None
    return total


# -------------------------------------------------------------------------------------- adapters
DeconvAdapter = Deconv
"""The training-only cross-scale adapter of ``deconv: true``: :class:`kdsweep.models.cross_scale.Deconv`."""


class _MapTerm(KDTerm):
    """Shared part of ``mimic`` and ``mimic_full``: adapted student maps and matched teacher maps."""

    name = "mimic"

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_levels: int,
        adapter: bool | str = False,
        deconv: bool = False,
        deconv_scale: int = 2,
    ) -> None:
        super().__init__()
        n = self.name
        if not isinstance(deconv, bool):
            raise ConfigError(f"kd.{n}.params.deconv {deconv!r} must be true or false")
        if not isinstance(deconv_scale, int) or deconv_scale < 2 or deconv_scale & (deconv_scale - 1):
            raise ConfigError(f"kd.{n}.params.deconv_scale {deconv_scale!r} must be a power of 2 >= 2")
        check_widths(n, student_channels, teacher_channels, num_levels, adapter or deconv)
        self.num_levels = num_levels
        self.deconv = deconv
        self.deconv_scale = deconv_scale
        if deconv:
            self.adapters: nn.ModuleList | None = nn.ModuleList(
                DeconvAdapter(student_channels, teacher_channels, deconv_scale) for _ in range(num_levels))
        else:
            self.adapters = level_adapters(n, student_channels, teacher_channels, num_levels, adapter)

    def maps(self, step: KDStep) -> list[tuple[str, Tensor, Tensor, float]]:
        """Per level ``(name, r(student), teacher (detached), cell)``, ``cell`` = the maps' stride
        in student input pixels (``2**k``; ``2**k / deconv_scale`` with the deconvolution adapter;
        ``2**k / upsample`` for a student whose own deconvolution upsamples its maps)."""
        levels = tuple(step.levels)
        if len(levels) != self.num_levels:
            raise ValueError(f"kd.{self.name}: expected {self.num_levels} levels, got {len(levels)}")
        out = []
        if self.deconv:
            scale = 1.0 if step.teacher_scale is None else float(step.teacher_scale)
            if abs(scale - self.deconv_scale) > 1e-6:
                raise ValueError(f"kd.{self.name}: deconv upsamples the student x{self.deconv_scale} but "
                                 f"teacher_scale is {scale:g}; set teacher_scale: {self.deconv_scale}")
            for i, level in enumerate(levels):
                s = self.adapters[i](step.student_feats[level])  # type: ignore[index]
                t = _crop_or_pad(step.teacher_feats[level], tuple(s.shape[-2:])).to(s.dtype).detach()
                out.append((level, s, t, 2 ** _level_k(level) / self.deconv_scale))
        else:
            students, teachers = step.aligned(levels)
            finer = feature_upsample(step.student)  # Li et al.'s student with its deconvolution: P_k at 2**k / finer
            for i, (level, s, t) in enumerate(zip(levels, students, teachers)):
                if self.adapters is not None:
                    s = self.adapters[i](s)
                out.append((level, s, t.detach(), float(2 ** _level_k(level)) / finer))
        for level, s, t, _ in out:
            if s.shape != t.shape:
                raise ValueError(f"kd.{self.name}: level {level}: student {tuple(s.shape)} vs teacher "
                                 f"{tuple(t.shape)} (after the adapter); align resolution and channels first")
        return out


def _check_sampling(name: str, num_rois: Any, positive_fraction: Any, iou_threshold: Any) -> None:
    if isinstance(num_rois, bool) or not isinstance(num_rois, int) or num_rois < 1:
        raise ConfigError(f"kd.{name}.params.num_rois {num_rois!r} must be an integer >= 1")
    if not isinstance(positive_fraction, (int, float)) or not 0.0 < positive_fraction <= 1.0:
        raise ConfigError(f"kd.{name}.params.positive_fraction {positive_fraction!r} must be in (0, 1]")
    if not isinstance(iou_threshold, (int, float)) or not 0.0 < iou_threshold <= 1.0:
        raise ConfigError(f"kd.{name}.params.iou_threshold {iou_threshold!r} must be in (0, 1]")


class _Sampling:
    """Region sampling shared by ``mimic`` and ``mimic_head`` (see the module docstring)."""

    name: str
    num_rois: int
    positive_fraction: float
    iou_threshold: float

    def regions(self, step: KDStep) -> list[Tensor]:
        """Per image (n_i, 4) mimic regions in the student's input coordinates."""
        gt = _step_gt(step, self.name)
        if step.proposals is not None:
            return sample_rois(step.proposals, gt, num=self.num_rois, positive_fraction=self.positive_fraction,
                               iou_threshold=self.iou_threshold)
        if step.image_sizes is None:
            raise RuntimeError(f"kd.{self.name}: the student's image sizes were not captured")
        return one_stage_regions(gt, step.image_sizes, num=self.num_rois, positive_fraction=self.positive_fraction)


# ------------------------------------------------------------------------------------------ terms
class MimicTerm(_MapTerm, _Sampling):
    """``mimic``: proposal-sampled region mimicking (Li et al. 2017), see the module docstring.

    Args:
        student_channels, teacher_channels, num_levels: FPN channels; the term's level count.
        adapter: one 1x1 conv per level (required when the channels differ, unless ``deconv``).
        num_rois: regions per image (128); positive_fraction: 0.5 (1:1); iou_threshold: 0.5.
        pooled: None (regions at their own size) or ``k``: RoIAlign to ``k x k``.
        assign: ``"fpn"`` (each region on its FPN level) or ``"all"`` (every level, averaged).
        deconv, deconv_scale: cross-scale mimic through a :class:`DeconvAdapter` per level.

    Shape:
        ``forward(step)``: ``step.student_feats`` / teacher maps of the term's levels, ``step.targets``,
        ``step.proposals`` (two-stage) or ``step.image_sizes`` (one-stage); output ``()``.
    """

    name = "mimic"

    def __init__(
        self,
        *,
        student_channels: int,
        teacher_channels: int,
        num_levels: int,
        adapter: bool | str = False,
        num_rois: int = 128,
        positive_fraction: float = 0.5,
        iou_threshold: float = 0.5,
        pooled: int | None = None,
        assign: str = "fpn",
        deconv: bool = False,
        deconv_scale: int = 2,
        two_stage: bool = False,
    ) -> None:
        _check_sampling(self.name, num_rois, positive_fraction, iou_threshold)
        if pooled is not None and (isinstance(pooled, bool) or not isinstance(pooled, int) or pooled < 1):
            raise ConfigError(f"kd.{self.name}.params.pooled {pooled!r} must be null or an integer >= 1")
        if assign not in ("fpn", "all"):
            raise ConfigError(f"kd.{self.name}.params.assign '{assign}' is unknown; use fpn or all")
        super().__init__(student_channels=student_channels, teacher_channels=teacher_channels,
                         num_levels=num_levels, adapter=adapter, deconv=deconv, deconv_scale=deconv_scale)
        self.num_rois = num_rois
        self.positive_fraction, self.iou_threshold = float(positive_fraction), float(iou_threshold)
        self.pooled, self.assign = pooled, assign
        self.needs = frozenset({Need.TARGETS, Need.PROPOSALS} if two_stage else {Need.TARGETS})

    def forward(self, step: KDStep) -> Tensor:
        maps = self.maps(step)
        rois = boxes_to_rois(self.regions(step))
        rois = rois.to(device=maps[0][1].device, dtype=torch.float32)
        zero = _zero_on([s for _, s, _, _ in maps])
        if rois.shape[0] == 0:
            return zero
        if self.assign == "all":
            losses = []
            for _, s, t, cell in maps:
                cells = torch.cat([rois[:, :1], rois[:, 1:] / cell], 1)
                losses.append(region_mimic_loss(s, t, cells, pooled=self.pooled))
            return zero + torch.stack(losses).mean()
        # where the student's R-CNN pools each region: a student whose maps a deconvolution made
        # `finer` x finer pools a box from the level named as a `finer` x larger box's (its RoI
        # pooler reads the scales off the maps); the adapter path keeps the student's own levels
        finer = 1 if self.deconv else feature_upsample(step.student)
        which = assign_levels(rois[:, 1:] * finer, [level for level, _, _, _ in maps])
        errors = []
        for i, (_, s, t, cell) in enumerate(maps):
            mine = rois[which == i]
            if mine.shape[0]:
                errors.append(region_errors(s, t, torch.cat([mine[:, :1], mine[:, 1:] / cell], 1), pooled=self.pooled))
        return zero + torch.cat(errors).sum() / (2 * rois.shape[0])

    def extra_repr(self) -> str:
        return (f"num_levels={self.num_levels}, num_rois={self.num_rois}, positive_fraction={self.positive_fraction}, "
                f"iou_threshold={self.iou_threshold}, pooled={self.pooled}, assign={self.assign!r}, "
                f"deconv={self.deconv}")


class FullMapMimicTerm(_MapTerm):
    """``mimic_full``: whole-map L2 regression, the paper's failing baseline.

    ``sum_l 0.5 * mean((r(s_l) - t_l)^2)`` over the level's ``N*C*H*W`` values (*choice*: the
    per-level mean keeps levels of different sizes equally weighted, as the other feature terms).
    ``adapter`` / ``deconv`` as :class:`MimicTerm`.
    """

    name = "mimic_full"

    def forward(self, step: KDStep) -> Tensor:
        total = None
        for _, s, t, _ in self.maps(step):
            loss = 0.5 * F.mse_loss(s.float(), t.float())
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}, deconv={self.deconv}"


def _is_two_stage(model: nn.Module | None) -> bool:
    return model is not None and hasattr(model, "rpn") and hasattr(model, "roi_heads")


def _dense_head(model: nn.Module) -> nn.Module | None:
    return getattr(model, "head", None) if not _is_two_stage(model) else None


def _half_mse(a: Tensor, b: Tensor) -> Tensor:
    return 0.5 * F.mse_loss(a.float(), b.float().detach())


class LogitsMimicTerm(KDTerm):
    """``mimic_logits``: L2 on the dense detector outputs (the paper's failing logits baseline).

    The teacher's dense head runs (``no_grad``) on the teacher's FPN maps resized to the student's
    map sizes (``step.aligned()`` over every student level), so its outputs line up anchor by anchor
    with the student's. Each output is compared by ``0.5 * MSE`` (mean over all its values):

    * one-stage (RetinaNet, FCOS): every key of the head's output dict, against
      ``step.head_outputs``; parts ``cls`` (``cls_logits``), ``bbox`` (``bbox_regression``) and, for
      FCOS, ``ctrness`` (``bbox_ctrness``);
    * two-stage (Faster R-CNN): the RPN head's objectness logits (``cls``) and box deltas
      (``bbox``), the student's RPN head re-run on its own maps (with the gradient).

    Teacher and student must be the same kind of detector with the same anchors per location and
    classes (checked by :func:`build_mimic_logits`); the FPN widths may differ (each head reads its
    own model's maps).
    """

    name = "mimic_logits"

    def __init__(self, *, two_stage: bool) -> None:
        super().__init__()
        self.two_stage = two_stage
        self.needs = frozenset({Need.TEACHER_LEVELS} if two_stage else {Need.HEAD, Need.TEACHER_LEVELS})

    def forward(self, step: KDStep) -> dict[str, Tensor]:
        teacher = step.teacher
        if teacher is None:
            raise RuntimeError("kd.mimic_logits: the context carries no teacher model")
        order = tuple(level_names(step.student).values())
        missing = [lv for lv in order if lv not in step.student_feats or lv not in step.teacher_feats]
        if missing:
            raise RuntimeError(f"kd.mimic_logits: levels {missing} were not captured; it uses every student level")
        students, teachers = step.aligned(order)
        with torch.no_grad():
            if self.two_stage:
                t_obj, t_box = teacher.rpn.head([t.detach() for t in teachers])
            else:
                t_out = teacher.head([t.detach() for t in teachers])
        if self.two_stage:
            s_obj, s_box = step.student.rpn.head(students)
            flat = lambda xs: torch.cat([x.flatten(1) for x in xs], 1)  # noqa: E731
            return {"cls": _half_mse(flat(s_obj), flat(t_obj)), "bbox": _half_mse(flat(s_box), flat(t_box))}
        if step.head_outputs is None:
            raise RuntimeError("kd.mimic_logits: the student's head outputs were not captured")
        parts = {"cls_logits": "cls", "bbox_regression": "bbox", "bbox_ctrness": "ctrness"}
        out = {}
        for key, s in step.head_outputs.items():
            if key in t_out:
                out[parts.get(key, key)] = _half_mse(s, t_out[key])
        return out

    def extra_repr(self) -> str:
        return f"two_stage={self.two_stage}"


class HeadMimicTerm(KDTerm, _Sampling):
    """``mimic_head``: the two-stage mimic, L2 between the R-CNN heads on the student's proposals.

    Regions: :func:`sample_rois` of the student's RPN proposals (``num_rois``,
    ``positive_fraction``, ``iou_threshold`` as ``mimic``). The student's ``box_roi_pool`` ->
    ``box_head`` -> ``box_predictor`` run on its FPN maps; the teacher's, under ``no_grad``, on its
    own maps (``step.teacher_out.feats``, at its resolution) with the same regions mapped into its
    input coordinates (x by teacher width / student width, y by height, per image, from the two
    transforms' image sizes: ``teacher_scale`` up to the transforms' rounding; ``teacher_scale``
    itself when the teacher's sizes are unknown) and its image sizes. Box-regression outputs are
    deltas relative to the proposal (``dx/w``, ``log(w'/w)``), scale free, so the two compare
    directly. Parts: ``cls`` = ``0.5 * MSE`` of the class logits (R, K+1), ``bbox`` = ``0.5 * MSE``
    of the box regressions (R, 4(K+1)).
    """

    name = "mimic_head"
    needs = frozenset({Need.TARGETS, Need.PROPOSALS, Need.TEACHER_LEVELS})

    def __init__(self, *, num_rois: int = 128, positive_fraction: float = 0.5, iou_threshold: float = 0.5) -> None:
        _check_sampling(self.name, num_rois, positive_fraction, iou_threshold)
        super().__init__()
        self.num_rois = num_rois
        self.positive_fraction, self.iou_threshold = float(positive_fraction), float(iou_threshold)

    @staticmethod
    def _run_head(model: nn.Module, feats: Mapping[str, Tensor], boxes: list[Tensor],
                  sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        heads = model.roi_heads
        pooled = heads.box_roi_pool(feats, boxes, sizes)
        return heads.box_predictor(heads.box_head(pooled))

    def forward(self, step: KDStep) -> dict[str, Tensor]:
        teacher = step.teacher
        if teacher is None:
            raise RuntimeError("kd.mimic_head: the context carries no teacher model")
        if step.proposals is None or step.image_sizes is None:
            raise RuntimeError("kd.mimic_head: the student's RPN proposals were not captured "
                               "(two-stage student needed)")
        boxes = self.regions(step)
        s_feats = roi_levels(step.student, step.student_feats, "student", self.name)
        s_cls, s_box = self._run_head(step.student, s_feats, boxes, list(step.image_sizes))
        t_boxes, t_sizes = step.teacher_rois(boxes)
        with torch.no_grad():
            t_feats = roi_levels(teacher, {k: v.detach() for k, v in step.teacher_feats.items()}, "teacher", self.name)
            t_cls, t_box = self._run_head(teacher, t_feats, t_boxes, t_sizes)
        if s_cls.shape[0] == 0:
            zero = sum(x.sum() for x in s_feats.values()) * 0.0
            return {"cls": zero, "bbox": zero}
        return {"cls": _half_mse(s_cls, t_cls), "bbox": _half_mse(s_box, t_box)}

    def extra_repr(self) -> str:
        return (f"num_rois={self.num_rois}, positive_fraction={self.positive_fraction}, "
                f"iou_threshold={self.iou_threshold}")


# ---------------------------------------------------------------------------------------- builders
MIMIC_PARAMS = ("num_rois", "positive_fraction", "iou_threshold", "pooled", "assign", "deconv", "deconv_scale")
FULL_PARAMS = ("deconv", "deconv_scale")
HEAD_PARAMS = ("num_rois", "positive_fraction", "iou_threshold")


def _one_deconvolution(spec: TermSpec) -> None:
    """``deconv: true`` upsamples the student's maps for the loss; a student that already upsamples
    its own (``student.upsample``) would be upsampled twice."""
    if spec.params.get("deconv") and feature_upsample(spec.student) > 1:
        raise ConfigError(f"kd.{spec.loss}.params.deconv: the student already upsamples its maps (student.upsample "
                          f"{feature_upsample(spec.student)}); drop deconv")


def build_mimic(spec: TermSpec) -> MimicTerm:
    """Registry builder of ``mimic`` (params: :data:`MIMIC_PARAMS`, see :class:`MimicTerm`)."""
    reject_unknown("mimic", spec.params, sorted(MIMIC_PARAMS))
    _one_deconvolution(spec)
    return MimicTerm(student_channels=spec.student_channels, teacher_channels=spec.teacher_channels,
                     num_levels=spec.num_levels, adapter=spec.adapter, two_stage=_is_two_stage(spec.student),
                     **dict(spec.params))


def build_mimic_full(spec: TermSpec) -> FullMapMimicTerm:
    """Registry builder of ``mimic_full`` (params: ``deconv``, ``deconv_scale``)."""
    reject_unknown("mimic_full", spec.params, sorted(FULL_PARAMS))
    _one_deconvolution(spec)
    return FullMapMimicTerm(student_channels=spec.student_channels, teacher_channels=spec.teacher_channels,
                            num_levels=spec.num_levels, adapter=spec.adapter, **dict(spec.params))


def _num_classes(model: nn.Module) -> int | None:
    if _is_two_stage(model):
        return int(model.roi_heads.box_predictor.cls_score.out_features)
    head = getattr(model, "head", None)
    return getattr(getattr(head, "classification_head", None), "num_classes", None)


def _anchors_per_location(model: nn.Module) -> int:
    gen = model.rpn.anchor_generator if _is_two_stage(model) else model.anchor_generator
    return int(gen.num_anchors_per_location()[0])


def build_mimic_logits(spec: TermSpec) -> LogitsMimicTerm:
    """Registry builder of ``mimic_logits`` (no params; ``adapter`` is not used).

    Raises:
        ConfigError: different detector kinds, anchors per location or class counts, or fewer
            levels than the student has.
    """
    reject_unknown("mimic_logits", spec.params, ())
    student, teacher, num_levels = spec.student, spec.teacher, spec.num_levels
    if type(student) is not type(teacher):
        raise ConfigError(f"kd.mimic_logits compares dense head outputs: student ({type(student).__name__}) and "
                          f"teacher ({type(teacher).__name__}) must be the same arch")
    if not _is_two_stage(student) and _dense_head(student) is None:
        raise ConfigError(f"kd.mimic_logits: {type(student).__name__} has no dense head")
    sa, ta = _anchors_per_location(student), _anchors_per_location(teacher)
    if sa != ta:
        raise ConfigError(f"kd.mimic_logits: student has {sa} anchors per location, the teacher {ta}; "
                          "use the same anchors")
    sc, tc = _num_classes(student), _num_classes(teacher)
    if not _is_two_stage(student) and sc != tc:
        raise ConfigError(f"kd.mimic_logits: student predicts {sc} classes, the teacher {tc}; use the same classes "
                          "(set student.num_classes and teacher.num_classes equal)")
    levels = len(level_names(student))
    if num_levels != levels:
        raise ConfigError(f"kd.mimic_logits uses every student level ({levels}); drop kd.mimic_logits.levels")
    return LogitsMimicTerm(two_stage=_is_two_stage(student))


def build_mimic_head(spec: TermSpec) -> HeadMimicTerm:
    """Registry builder of ``mimic_head`` (params: ``num_rois``, ``positive_fraction``,
    ``iou_threshold``; ``adapter`` is not used).

    Raises:
        ConfigError: student or teacher not a Faster R-CNN, different class counts, or fewer
            levels than the student has.
    """
    reject_unknown("mimic_head", spec.params, sorted(HEAD_PARAMS))
    student, teacher, num_levels = spec.student, spec.teacher, spec.num_levels
    for who, model in (("student", student), ("teacher", teacher)):
        if not _is_two_stage(model):
            name = type(model).__name__ if model is not None else "none"
            raise ConfigError(f"kd.mimic_head needs a Faster R-CNN {who} (its R-CNN head is mimicked), got {name}; "
                              f"use {who}.arch: fasterrcnn")
    sc, tc = _num_classes(student), _num_classes(teacher)  # type: ignore[arg-type]
    if sc != tc:
        raise ConfigError(f"kd.mimic_head: student predicts {sc} classes, the teacher {tc}; use the same classes "
                          "(set student.num_classes and teacher.num_classes equal)")
    levels = len(level_names(student))  # type: ignore[arg-type]
    if num_levels != levels:
        raise ConfigError(f"kd.mimic_head uses every student level ({levels}); drop kd.mimic_head.levels")
    return HeadMimicTerm(**dict(spec.params))

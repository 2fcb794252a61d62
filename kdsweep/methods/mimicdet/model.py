"""MimicDet (Lu, Li, Li, Yan, ECCV 2020) from torchvision parts: a one-stage detector (refinement
module + S-head) that, in training only, mimics a two-stage head (T-head) sharing its backbone.

Nothing here copies a torchvision detector: the parts are ``torchvision.models.resnet`` +
``IntermediateLayerGetter`` (C2..C5), ``torchvision.ops.FeaturePyramidNetwork`` /
``LastLevelP6P7``, ``AnchorGenerator`` (cell anchors), ``DeformConv2d``, ``MultiScaleRoIAlign``,
``BoxCoder`` / ``Matcher`` / ``BalancedPositiveNegativeSampler``, ``sigmoid_focal_loss``,
``batched_nms`` and ``GeneralizedRCNNTransform``. See ``/work/shared/METHODS.md`` section 2.

Calling convention (as torchvision detectors): train mode
``model(images: list[(3, H, W)], targets: list[{"boxes": (n, 4) xyxy, "labels": (n,) in 1..K}])``
returns a dict of scalar losses whose plain sum is the total loss
``L = L_R + L_S + L_T + lambda * L_mimic``:

* ``refine_cls`` (focal objectness), ``refine_reg`` (smooth-L1): ``L_R``, the refinement module;
* ``s_cls`` (hard-negative-mined cross-entropy), ``s_reg`` (L1): ``L_S``, the S-head;
* ``t_cls`` (softmax cross-entropy), ``t_reg`` (L1): ``L_T``, the T-head (only with ``t_head=True``);
* ``mimic``: ``mimic_weight`` x (sum of the enabled paths' similarity losses), already weighted
  (only with ``t_head=True`` and at least one mimic path).

With ``t_head="external"`` (the ablation row "mimic, separate teacher of the same depth") the dict has only
``refine_*`` and ``s_*``: the T-side of the mimic is a separately trained, frozen two-stage teacher
run by a KD term (``kdsweep.methods.mimicdet.kd``, registry key ``mimicdet_teacher``), which reads
the step's :class:`MimicInputs` from ``model.last_mimic_inputs`` (see "External teacher" below).

Eval mode ``model(images)`` returns ``[{"boxes": (d, 4), "scores": (d,), "labels": (d,)}]`` in
original image coordinates (labels ``1..K``).

Design (choices the paper leaves open are marked *choice*):

* **Backbone and staggered pyramid.** ``model.backbone`` (:class:`MimicDetBackbone`) is a ResNet
  body returning C2..C5 and one torchvision ``FeaturePyramidNetwork`` over C2..C5 (+
  ``LastLevelP6P7`` on the P5 output, as RetinaNet). Its top-down pass is run by hand over the
  FPN's own blocks so that P2 (the C2 lateral ``fpn.inner_blocks[0]`` and output conv
  ``fpn.layer_blocks[0]``) is computed **only in training**; P3..P7 are bit-identical in both
  modes (P2 sits below P3 in the top-down path, so dropping it changes nothing above it). The
  backbone returns a :class:`Pyramid`: an ``OrderedDict`` ``{"p3": ..., "p7": ...}`` (the S-side
  set, in both modes) with the training-only P2 carried as the attribute ``.p2`` (``None`` in
  eval). Hooks on ``model.backbone`` (``kdsweep.models.taps.FeatureTap``),
  ``extract_features`` and ``level_names`` therefore see the same P3..P7 in train and eval.
  The T-head reads {P2..P6} (``staggered=True``) or {P3..P7} (``staggered=False``, the
  ablation; P2 is then not built at all); the refinement module and S-head always read {P3..P7}.
  Without a T-head P2 is not built either.
* **Anchors** (*choice*): ``A = len(aspect_ratios) * scales_per_octave`` per position, sizes
  ``anchor_scale * stride * 2**(i / scales_per_octave)``; default one square anchor per position
  (A = 1) because the guided deformable conv has one sampling pattern per position and can only
  line up with one refined anchor (as Guided Anchoring / AlignDet). Grids use the exact level
  strides ``2**k`` (torchvision's ``AnchorGenerator.forward`` infers ``padded_size // grid`` which
  is off on P6/P7 when the padded size is not a multiple of 128); anchor ``(y, x, a)`` is centred
  at ``(x * s, y * s)`` as in torchvision; flattened order is level, y, x, anchor.
* **Refinement module** (:class:`RefinementModule`, ``model.refine``): shared over P3..P7,
  ``refine_convs`` conv3x3+ReLU then conv3x3 heads: objectness (A channels) and anchor deltas
  (4A channels, ``BoxCoder`` weights 1,1,1,1) relative to the base anchors. Targets: IoU >= 0.5
  positive, < 0.4 negative, in between ignored, plus each GT's best anchor (low-quality
  matches). Losses: sigmoid focal loss (alpha 0.25, gamma 2) on objectness and smooth-L1
  (beta 1/9) on positives' deltas, both summed and divided by the number of positives.
  Refined anchors = decode(deltas) (detached: they are proposals, as in two-stage detectors).
  **Easy negatives**: anchors with objectness probability < ``neg_filter`` (default 0.01) are left
  out of the S-head's classification loss (positives are always kept) and are not scored at
  inference (RefineDet's ARM filtering); ``neg_filter=0`` turns filtering off.
* **S-head** (:class:`SHead`, ``model.s_head``), shared over P3..P7: guided deformable conv — a
  1x1 conv (``offset3`` / ``offset5``) maps the refinement module's 4A-channel delta map to
  DeformConv2d offsets; the deformable conv is 3x3 on P3 (``dconv3``) and 5x5 on P4..P7
  (``dconv5``, as the paper). The delta map is detached before the offset conv
  (``detach_guidance=True``, as Guided Anchoring's feature adaption) so S-head losses do not
  pull the refinement regression (*choice*). One shared deformable conv + ReLU, then decomposed
  branches (*choice* of depth: ``s_convs`` conv3x3+ReLU each): ``cls_tower`` -> ``cls_logits``
  (A x C' logits) and ``reg_tower`` -> ``bbox_reg`` (A x 4 deltas relative to the REFINED anchors,
  ``BoxCoder`` weights 10,10,5,5 as a second stage). Labels on refined anchors: IoU >= 0.6
  positive (paper), < 0.4 negative (*choice*), in between ignored, plus low-quality matches.
  Classification: ``s_cls_loss="softmax"`` (default; C' = K + 1 with background index 0, softmax
  cross-entropy, as the paper's cross-entropy with 81-d logits on COCO) or ``"sigmoid"``
  (C' = K, per-class BCE, the labels' one-hot). **Hard negative mining** (SSD): per image all
  positives and the ``neg_pos_ratio`` (3) x max(#pos, 1) negatives with the largest loss (among
  negatives that passed the easy-negative filter); sum / #positives in the batch. Regression:
  L1 on positives, sum / #positives.
* **T-head** (:class:`THead`, ``model.t_head``, training only): RoIs are refined anchors clipped
  to the image. Per image, candidates are every refined anchor with IoU >= 0.6 to a GT
  (positives) and, as negatives, the ``t_candidates`` (1000) highest-objectness refined anchors
  with IoU < 0.6 (like RPN proposals; boxes under 1 px dropped); ``BalancedPositiveNegativeSampler``
  draws ``t_samples`` (128) RoIs with at most 25% positives (``t_positive_fraction``). RoIAlign
  7x7 by ``MultiScaleRoIAlign`` over the T-head levels with fixed scales ``2**-k`` and a
  canonical level mapping shifted to the anchors: a box the size of S-level k's anchor
  (``anchor_scale * 2**k``) pools from T-level k-1 when staggered (from k when not), i.e.
  canonical level 4 at ``anchor_scale * 2**5`` (``2**4`` unstaggered) px, clamped to the T levels.
  Classification branch ``cls_fc`` = 2 x (fc ``t_hidden`` + ReLU) -> ``cls_score`` (K + 1
  logits, softmax CE, mean over RoIs); regression branch ``reg_convs`` = 4 x conv3x3
  (``fpn_channels``) + ReLU -> flatten -> ``reg_fc`` (fc ``t_hidden`` + ReLU) -> ``bbox_pred``
  (4 class-agnostic deltas, weights 10,10,5,5; L1 on positives / #positives).
* **Dual-path mimic**: a random subset of ``mimic_samples`` of each image's T-head RoIs
  (positives and negatives alike, the paper's B_m drawn from the T-head's samples); each RoI
  is a refined anchor, i.e. a (level, y, x, anchor) position of the S-head. Classification path:
  with the softmax S-head, S-head logits (K + 1) vs T-head logits (K + 1) directly (the paper's
  logits-as-target); with the sigmoid S-head, S class probabilities ``sigmoid(K)`` vs the T-head's
  softmax probabilities of the K foreground classes (*choice*: compare in probability space).
  Regression path: the S-head's own ``t_hidden``-d regression feature of that anchor (``reg_fc``
  output, the feature its ``bbox_reg`` predicts the deltas from) vs the T-head's ``reg_fc`` output
  (``t_hidden``-d): "the 1024-d feature" of the paper's regression path, on both sides.
  ``similarity="cosine"``: mean of ``1 - cos``; ``"l2"``: mean squared error. The T-head side
  is the target and is **detached** (*choice*; the paper trains both heads jointly, detaching the
  teacher side is the usual mimic choice): mimic gradients reach the S-head and the shared
  backbone, never the T-head.
* **External teacher** (``t_head="external"``): no T-head and no P2 are built (``staggered`` is
  then moot). A training forward still samples the T-samples exactly as for the own T-head
  (:meth:`MimicDet.sample_rois`: same candidates, same sampler) and draws the random mimic subset
  B_m from them as :meth:`MimicDet.mimic_loss` does, then stores a :class:`MimicInputs` in
  ``model.last_mimic_inputs``: per image the sampled RoIs (clipped refined anchors, in the model's
  input coordinates, i.e. after its transform's resize, before batch padding) and their anchor
  indices, the subset ``pick``, the image sizes, and the S-side of the mimic for the subset rows
  (``s_cls``: S-head logits; ``s_reg``: the S-head's regression feature, ``t_hidden`` wide). ``last_mimic_inputs`` is reset to ``None`` at the start of every forward (eval included),
  so it always belongs to the latest training step; the tensors are attached to that step's graph.
  The KD term computes the teacher's targets on ``MimicInputs.mimic_rois`` and calls
  :meth:`MimicDet.mimic_from` (same detaching, sigmoid/softmax handling and similarity as the own
  T-head's mimic). ``t_hidden`` must then equal the teacher's box-head representation size (1024
  for torchvision's ``TwoMLPHead``). ``mimic_weight`` is not used (lambda is the KD term's weight).
* **Inference**: only P3..P7 (no P2), the refinement module and the S-head run. Scores are the
  S-head class probabilities of anchors passing the easy-negative filter; per level the top
  ``topk_candidates`` (1000) above ``score_thresh`` (0.05), decoded against the refined anchors,
  clipped, ``batched_nms`` (0.5) over levels, ``detections_per_img`` (100) kept, then
  ``transform.postprocess`` to original image coordinates.

Every parameter takes part in every training step (losses over empty selections are zero sums
still attached to the graph), so DDP needs no ``find_unused_parameters``; parts an option turns
off (T-head, P2 lateral) are not built.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import get_weight, resnet
from torchvision.models._api import WeightsEnum
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import DeformConv2d, FeaturePyramidNetwork, MultiScaleRoIAlign, sigmoid_focal_loss
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.ops.poolers import initLevelMapper

from kdsweep.kd.precision import autocast_off

S_LEVELS: tuple[int, ...] = (3, 4, 5, 6, 7)  # refinement module + S-head (and inference)
T_LEVELS_STAGGERED: tuple[int, ...] = (2, 3, 4, 5, 6)  # T-head, staggered pyramid
SIMILARITIES = ("cosine", "l2")
MIMIC_PATHS = ("cls", "reg")
S_CLS_LOSSES = ("softmax", "sigmoid")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------ backbone
class Pyramid(OrderedDict):
    """FPN output: ``{"p3": (N, C, H/8, W/8), ..., "p7": ...}`` plus the training-only P2 as the
    attribute ``p2`` ((N, C, H/4, W/4), or ``None`` when it was not computed)."""

    def __init__(self, *args: Any, p2: Tensor | None = None) -> None:
        super().__init__(*args)
        self.p2 = p2


class MimicDetBackbone(nn.Module):
    """ResNet C2..C5 (or C3..C5) + a torchvision FPN with P6/P7 (``LastLevelP6P7`` on P5).

    Attributes: ``body`` (``IntermediateLayerGetter``, keys ``c2``..``c5``), ``fpn``
    (``FeaturePyramidNetwork``; with P2, ``inner_blocks[0]`` / ``layer_blocks[0]`` are the P2
    path), ``out_channels``, ``with_p2``.

    ``forward(x)`` returns a :class:`Pyramid` of P3..P7; P2 is computed (``pyramid.p2``) only when
    ``with_p2`` and in training mode.
    """

    def __init__(self, body: nn.Module, in_channels: Sequence[int], out_channels: int, with_p2: bool) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(in_channels), out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels)
        )
        self.out_channels = out_channels
        self.with_p2 = with_p2

    def forward(self, x: Tensor) -> Pyramid:
        c = list(self.body(x).values())  # [C2,] C3, C4, C5
        fpn = self.fpn
        p2_now = self.with_p2 and self.training
        first = 0 if p2_now else int(self.with_p2)  # index of the finest level computed
        inner = fpn.inner_blocks[-1](c[-1])
        outs = [fpn.layer_blocks[-1](inner)]
        for idx in range(len(c) - 2, first - 1, -1):
            lateral = fpn.inner_blocks[idx](c[idx])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, fpn.layer_blocks[idx](inner))
        p2 = outs.pop(0) if p2_now else None
        outs, _ = fpn.extra_blocks(outs, c, [])  # appends P6 (from P5) and P7
        return Pyramid(zip((f"p{k}" for k in S_LEVELS), outs), p2=p2)


def _resolve_weights(name: str, weights: WeightsEnum | str | None) -> WeightsEnum | None:
    if weights is None or isinstance(weights, WeightsEnum):
        return weights
    return get_weight(weights.removeprefix("torchvision:"))


def build_backbone(
    name: str, fpn_channels: int, with_p2: bool, weights: WeightsEnum | str | None = None,
    trainable_layers: int = 5,
) -> MimicDetBackbone:
    """ResNet ``name`` body + FPN ``fpn_channels`` wide.

    ``weights`` None: random init, trainable BatchNorm, all layers trainable. ImageNet weights
    (enum or its name, optionally ``torchvision:``-prefixed; needs internet): FrozenBatchNorm2d and
    only the last ``trainable_layers`` (0..5) stages trainable, as torchvision's detectors.
    """
    if name not in RESNETS:
        raise ValueError(f"mimicdet backbone '{name}' is unknown; use one of {', '.join(RESNETS)}")
    enum = _resolve_weights(name, weights)
    norm: Callable[..., nn.Module] = FrozenBatchNorm2d if enum is not None else nn.BatchNorm2d
    net = getattr(resnet, name)(weights=enum, norm_layer=norm)
    if enum is not None:
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers {trainable_layers} must be in 0..5")
        train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            train.append("bn1")
        for pname, param in net.named_parameters():
            if all(not pname.startswith(layer) for layer in train):
                param.requires_grad_(False)
    stage2 = net.inplanes // 8  # C2 channels (64 basic / 256 bottleneck)
    ks = (2, 3, 4, 5) if with_p2 else (3, 4, 5)
    body = IntermediateLayerGetter(net, return_layers={f"layer{k - 1}": f"c{k}" for k in ks})
    in_channels = [stage2 * 2 ** (k - 2) for k in ks]
    return MimicDetBackbone(body, in_channels, fpn_channels, with_p2)


# -------------------------------------------------------------------------------------- heads
def _conv_tower(channels: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _init_normal(module: nn.Module, std: float = 0.01) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, DeformConv2d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _prior_bias(prior: float) -> float:
    return -math.log((1 - prior) / prior)


class RefinementModule(nn.Module):
    """Shared over levels: ``tower`` (conv3x3+ReLU x ``depth``) -> ``objectness`` (A ch) and
    ``bbox_reg`` (4A ch, anchor deltas). ``forward(feats)`` -> (objectness maps, delta maps)."""

    def __init__(self, channels: int, num_anchors: int, depth: int = 1, prior: float = 0.01) -> None:
        super().__init__()
        self.tower = _conv_tower(channels, depth)
        self.objectness = nn.Conv2d(channels, num_anchors, 3, padding=1)
        self.bbox_reg = nn.Conv2d(channels, 4 * num_anchors, 3, padding=1)
        _init_normal(self)
        nn.init.constant_(self.objectness.bias, _prior_bias(prior))

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        obj, reg = [], []
        for f in feats:
            t = self.tower(f)
            obj.append(self.objectness(t))
            reg.append(self.bbox_reg(t))
        return obj, reg


class SHead(nn.Module):
    """Guided-deformable-conv dense head, shared over P3..P7 (kernel 3 on the first level, 5 on
    the others).

    Modules: ``offset3`` / ``offset5`` (1x1 conv, 4A -> 2*k*k offsets), ``dconv3`` / ``dconv5``
    (``DeformConv2d``), ``cls_tower`` -> ``cls_logits`` (A*C' ch), and the regression branch
    ``reg_tower`` -> ``reg_fc`` (1x1 conv C -> A*reg_hidden, ReLU: each anchor's own
    ``reg_hidden``-d feature, the counterpart of the T-head's fc1024) -> ``bbox_reg`` (1x1 conv
    grouped per anchor, A*reg_hidden -> 4A). MimicDet mimics "the 1024-d feature" of the
    regression path in both heads: here that feature is the one ``bbox_reg`` predicts from, so the
    mimic shapes the S-head's own prediction path (no training-only projection to absorb it).
    ``forward(feats, guides)`` -> (cls maps, reg maps, per-anchor regression-feature maps
    ``(N, A*reg_hidden, H, W)``). With several anchors per position the feature map is
    ``A * reg_hidden`` wide (9 x 1024 for RetinaNet-style anchors: ~0.6 GB per 800 px image at
    P3 in float32); the default is one anchor per position.
    """

    def __init__(
        self, channels: int, num_anchors: int, num_outputs: int, depth: int = 2,
        kernels: Sequence[int] = (3, 5, 5, 5, 5), cls_prior: float | None = None,
        reg_hidden: int = 1024,
    ) -> None:
        super().__init__()
        if any(k not in (3, 5) for k in kernels):
            raise ValueError(f"S-head kernels must be 3 or 5, got {tuple(kernels)}")
        self.kernels = tuple(kernels)
        self.num_anchors = num_anchors
        guide = 4 * num_anchors
        self.offset3 = nn.Conv2d(guide, 2 * 3 * 3, 1)
        self.offset5 = nn.Conv2d(guide, 2 * 5 * 5, 1)
        self.dconv3 = DeformConv2d(channels, channels, 3, padding=1)
        self.dconv5 = DeformConv2d(channels, channels, 5, padding=2)
        self.cls_tower = _conv_tower(channels, depth)
        self.reg_tower = _conv_tower(channels, depth)
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_outputs, 3, padding=1)
        self.reg_hidden = reg_hidden
        self.reg_fc = nn.Conv2d(channels, num_anchors * reg_hidden, 1)
        self.bbox_reg = nn.Conv2d(num_anchors * reg_hidden, num_anchors * 4, 1, groups=num_anchors)
        _init_normal(self)
        for off in (self.offset3, self.offset5):  # Guided Anchoring's feature-adaption init
            nn.init.normal_(off.weight, std=0.1)
        if cls_prior is not None:
            nn.init.constant_(self.cls_logits.bias, _prior_bias(cls_prior))

    def offsets(self, guide: Tensor, kernel: int) -> Tensor:
        """DeformConv2d offsets (N, 2*k*k, H, W) from a refinement delta map (N, 4A, H, W)."""
        return (self.offset3 if kernel == 3 else self.offset5)(guide)

    def forward(self, feats: list[Tensor], guides: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        if len(feats) != len(self.kernels):
            raise ValueError(f"S-head expects {len(self.kernels)} levels, got {len(feats)}")
        cls, reg, reg_feats = [], [], []
        for f, g, k in zip(feats, guides, self.kernels):
            offsets = self.offsets(g, k)
            with autocast_off(f.device.type):  # float32, as torchvision's CUDA autocast runs it;
                # its CPU kernel has no bfloat16/float16 at all
                x = F.relu((self.dconv3 if k == 3 else self.dconv5)(f.float(), offsets.float()))
            rf = F.relu(self.reg_fc(self.reg_tower(x)))  # (N, A*reg_hidden, H, W)
            cls.append(self.cls_logits(self.cls_tower(x)))
            reg.append(self.bbox_reg(rf))
            reg_feats.append(rf)
        return cls, reg, reg_feats


class THead(nn.Module):
    """Two-stage head on RoIs: ``pooler`` (MultiScaleRoIAlign 7x7 over ``levels``), ``cls_fc``
    (2 x fc+ReLU) -> ``cls_score`` (num_outputs), ``reg_convs`` (4 x conv3x3+ReLU) -> ``reg_fc``
    (fc+ReLU) -> ``bbox_pred`` (4). ``forward(feats, rois, image_sizes)`` ->
    (logits (R, num_outputs), deltas (R, 4), regression feature (R, hidden))."""

    def __init__(
        self, channels: int, num_outputs: int, levels: Sequence[int], canonical_scale: float,
        hidden: int = 1024, reg_convs: int = 4, roi_size: int = 7,
    ) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.pooler = MultiScaleRoIAlign([f"p{k}" for k in self.levels], roi_size, sampling_ratio=2)
        # Exact scales instead of torchvision's per-batch inference from feature sizes (which
        # rounds wrongly for P6/P7 of padded small images); our own canonical mapping.
        self.pooler.scales = [2.0 ** -k for k in self.levels]
        self.pooler.map_levels = initLevelMapper(
            self.levels[0], self.levels[-1],
            canonical_scale=canonical_scale,  # type: ignore[arg-type]  # a float scale is fine
            canonical_level=4,
        )
        flat = channels * roi_size * roi_size
        self.cls_fc = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        )
        self.cls_score = nn.Linear(hidden, num_outputs)
        self.reg_convs = _conv_tower(channels, reg_convs)
        self.reg_fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True))
        self.bbox_pred = nn.Linear(hidden, 4)
        for conv in self.reg_convs.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(
        self, feats: dict[str, Tensor], rois: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = self.pooler(feats, rois, image_sizes)
        logits = self.cls_score(self.cls_fc(x))
        reg_feat = self.reg_fc(self.reg_convs(x))
        return logits, self.bbox_pred(reg_feat), reg_feat


# ------------------------------------------------------------------------------------- mimic
def mimic_similarity(student: Tensor, teacher: Tensor, similarity: str = "cosine") -> Tensor:
    """Mimic loss between row vectors (R, D): ``"cosine"`` mean ``1 - cos``, ``"l2"`` mean
    squared error. Zero for identical inputs (cosine: for non-zero rows). No rows: a zero still
    attached to ``student``'s graph."""
    if student.shape != teacher.shape:
        raise ValueError(f"mimic: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if student.shape[0] == 0:
        return student.sum() * 0.0
    if similarity == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()
    if similarity == "l2":
        return F.mse_loss(student, teacher)
    raise ValueError(f"mimic similarity '{similarity}' is unknown; use one of {', '.join(SIMILARITIES)}")


# ---------------------------------------------------------------------------------- detector
@dataclass
class MimicInputs:
    """What the dual-path mimic needs from the student side of one training step.

    Attributes:
        index: per image (T_i,) flat anchor indices (level, y, x, anchor order) of the T-samples.
        pick: per image (B_i,) positions into ``index[i]`` (and ``rois[i]``): the random mimic
            subset B_m (``mimic_samples`` per image, fewer when the image has fewer T-samples).
        s_cls: (sum B_i, C') S-head classification logits at the picked anchors, images
            concatenated in order (``None`` without the ``cls`` path).
        s_reg: (sum B_i, t_hidden) projected S-head regression features at the picked anchors
            (``None`` without the ``reg`` path).
        zero: a zero attached to the S-head's graph (the loss when there is nothing to mimic).
        rois: per image (T_i, 4) sampled RoIs (clipped refined anchors, xyxy) in the model's input
            coordinates (after its transform's resize); empty when not recorded (own T-head).
        image_sizes: per image (H, W) after the model's transform.
    """

    index: list[Tensor]
    pick: list[Tensor]
    s_cls: Tensor | None
    s_reg: Tensor | None
    zero: Tensor
    rois: list[Tensor] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def mimic_rois(self) -> list[Tensor]:
        """Per image (B_i, 4): the RoIs of the mimic subset, rows in ``s_cls``/``s_reg`` order."""
        return [r[p] for r, p in zip(self.rois, self.pick)]

    @property
    def rows(self) -> Tensor:
        """(sum B_i,) rows of the subset in the images' T-samples concatenated."""
        starts = [0]
        for idx in self.index[:-1]:
            starts.append(starts[-1] + idx.numel())
        return torch.cat([s + p for s, p in zip(starts, self.pick)])

    @property
    def num_mimic(self) -> int:
        return sum(int(p.numel()) for p in self.pick)


@dataclass
class DenseOutput:
    """Flattened (level, y, x, anchor order) outputs of the refinement module and S-head.

    ``anchors`` (M, 4); ``objectness`` (N, M) logits; ``refine_deltas`` (N, M, 4); ``refined``
    (N, M, 4) detached refined anchors; ``cls`` (N, M, C'); ``reg`` (N, M, 4); ``reg_feats``
    per-level (N, C, H, W); ``counts`` anchors per level; ``loc`` (M,) index of each anchor's
    position in the level-concatenated positions; ``slot`` (M,) its anchor index 0..A-1.
    """

    anchors: Tensor
    objectness: Tensor
    refine_deltas: Tensor
    refined: Tensor
    cls: Tensor
    reg: Tensor
    reg_feats: list[Tensor]
    counts: list[int]
    loc: Tensor
    slot: Tensor


def _flatten(x: Tensor, num_anchors: int) -> Tensor:
    """(N, A*D, H, W) -> (N, H*W*A, D) in (y, x, anchor) order."""
    n, c, h, w = x.shape
    d = c // num_anchors
    return x.view(n, num_anchors, d, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, d)


def _match(matcher: Matcher, gt: Tensor, boxes: Tensor) -> Tensor:
    if gt.numel() == 0:
        return torch.full((boxes.shape[0],), Matcher.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=boxes.device)
    return matcher(box_ops.box_iou(gt, boxes))


class MimicDet(nn.Module):
    """MimicDet detector; see the module docstring for the design and :func:`build_mimicdet`
    for the options. Attributes: ``transform``, ``backbone`` (:class:`MimicDetBackbone`),
    ``anchor_generator``, ``refine`` (:class:`RefinementModule`), ``s_head`` (:class:`SHead`),
    ``t_head`` (:class:`THead` or ``None``), ``external_teacher`` (``t_head="external"``) and
    ``last_mimic_inputs`` (:class:`MimicInputs` of the latest training forward in external-teacher
    mode, else ``None``)."""

    def __init__(
        self,
        backbone: MimicDetBackbone,
        num_classes: int,
        *,
        min_size: int = 192,
        max_size: int = 192,
        anchor_scale: float = 4.0,
        aspect_ratios: Sequence[float] = (1.0,),
        scales_per_octave: int = 1,
        staggered: bool = True,
        t_head: bool | str = True,
        mimic_weight: float = 1.0,
        similarity: str = "cosine",
        mimic_paths: Sequence[str] = MIMIC_PATHS,
        mimic_samples: int = 64,
        detach_teacher: bool = True,
        t_samples: int = 128,
        t_positive_fraction: float = 0.25,
        t_candidates: int = 1000,
        t_hidden: int = 1024,
        t_iou: float = 0.6,
        refine_convs: int = 1,
        refine_pos_iou: float = 0.5,
        refine_neg_iou: float = 0.4,
        s_convs: int = 2,
        s_cls_loss: str = "softmax",
        s_pos_iou: float = 0.6,
        s_neg_iou: float = 0.4,
        neg_pos_ratio: float = 3.0,
        neg_filter: float = 0.01,
        detach_guidance: bool = True,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes {num_classes} must be >= 1 (classes without background)")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity '{similarity}' is unknown; use one of {', '.join(SIMILARITIES)}")
        if s_cls_loss not in S_CLS_LOSSES:
            raise ValueError(f"s_cls_loss '{s_cls_loss}' is unknown; use one of {', '.join(S_CLS_LOSSES)}")
        paths = tuple(mimic_paths)
        if any(p not in MIMIC_PATHS for p in paths):
            raise ValueError(f"mimic_paths {paths} must be a subset of {MIMIC_PATHS}")
        if mimic_weight < 0:
            raise ValueError(f"mimic_weight {mimic_weight} must be >= 0")
        if not (isinstance(t_head, bool) or t_head == "external"):
            raise ValueError(f"t_head {t_head!r} must be true, false or 'external'")
        external = t_head == "external"
        own_t_head = t_head is True
        if external and not paths:
            raise ValueError("t_head 'external' needs at least one mimic path (mimic_paths: cls and/or reg)")
        t_levels = T_LEVELS_STAGGERED if staggered else S_LEVELS
        if backbone.with_p2 != (own_t_head and staggered):
            raise ValueError("backbone.with_p2 must be True exactly when the own T-head is on and staggered")
        c = backbone.out_channels
        self.num_classes = num_classes
        self.transform = GeneralizedRCNNTransform(min_size, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD))
        self.backbone = backbone
        octave = [2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        sizes = tuple(tuple(anchor_scale * 2**k * o for o in octave) for k in S_LEVELS)
        self.anchor_generator = AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(S_LEVELS))
        self.num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        a = self.num_anchors
        self.refine = RefinementModule(c, a, refine_convs)
        self.s_cls_loss = s_cls_loss
        s_out = num_classes + 1 if s_cls_loss == "softmax" else num_classes
        self.mimic_paths = paths if (own_t_head or external) else ()
        self.external_teacher = external
        self.t_hidden = t_hidden
        self.last_mimic_inputs: MimicInputs | None = None
        self.s_head = SHead(
            c, a, s_out, s_convs, kernels=(3,) + (5,) * (len(S_LEVELS) - 1),
            cls_prior=0.01 if s_cls_loss == "sigmoid" else None,
            reg_hidden=t_hidden,
        )
        canonical = anchor_scale * 2 ** (4 + (1 if staggered else 0))
        self.t_head = THead(c, num_classes + 1, t_levels, canonical, t_hidden) if own_t_head else None
        self.staggered = staggered
        self.mimic_weight = mimic_weight
        self.similarity = similarity
        self.mimic_samples = mimic_samples
        self.detach_teacher = detach_teacher
        self.detach_guidance = detach_guidance
        self.t_candidates = t_candidates
        self.neg_pos_ratio = neg_pos_ratio
        self.neg_filter = neg_filter
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.refine_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))  # S-head and T-head, w.r.t. refined anchors
        self.refine_matcher = Matcher(refine_pos_iou, refine_neg_iou, allow_low_quality_matches=True)
        self.s_matcher = Matcher(s_pos_iou, s_neg_iou, allow_low_quality_matches=True)
        self.t_iou = t_iou
        self.t_sampler = BalancedPositiveNegativeSampler(t_samples, t_positive_fraction)

    # ------------------------------------------------------------------------------ forward
    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("MimicDet in training mode needs targets")
        self.last_mimic_inputs = None
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        pyramid = self.backbone(image_list.tensors)
        out = self.dense(list(pyramid.values()))
        if not self.training:
            detections = self.postprocess(out, image_list.image_sizes)
            return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        assert targets is not None
        return self.losses(pyramid, out, image_list, targets)

    def anchors(self, feats: list[Tensor]) -> Tensor:
        """Base anchors (M, 4) for P3..P7 maps, exact strides ``2**k``, (level, y, x, a) order."""
        gen = self.anchor_generator
        gen.set_cell_anchors(feats[0].dtype, feats[0].device)
        grids = [list(f.shape[-2:]) for f in feats]
        strides = [[torch.tensor(2**k, dtype=torch.int64, device=feats[0].device)] * 2 for k in S_LEVELS]
        return torch.cat(gen.grid_anchors(grids, strides))

    def dense(self, feats: list[Tensor]) -> DenseOutput:
        """Refinement module + S-head on P3..P7 (both modes)."""
        a = self.num_anchors
        obj_maps, delta_maps = self.refine(feats)
        guides = [d.detach() for d in delta_maps] if self.detach_guidance else delta_maps
        cls_maps, reg_maps, reg_feats = self.s_head(feats, guides)
        anchors = self.anchors(feats)
        deltas = torch.cat([_flatten(d, a) for d in delta_maps], 1)
        n = deltas.shape[0]
        refined = self.refine_coder.decode_single(deltas.detach().reshape(-1, 4), anchors.repeat(n, 1)).view(n, -1, 4)
        positions = [f.shape[-2] * f.shape[-1] for f in feats]
        loc = torch.arange(sum(positions), device=anchors.device).repeat_interleave(a)
        slot = torch.arange(a, device=anchors.device).repeat(sum(positions))
        return DenseOutput(
            anchors=anchors,
            objectness=torch.cat([_flatten(o, a) for o in obj_maps], 1).squeeze(-1),
            refine_deltas=deltas,
            refined=refined,
            cls=torch.cat([_flatten(x, a) for x in cls_maps], 1),
            reg=torch.cat([_flatten(x, a) for x in reg_maps], 1),
            reg_feats=reg_feats,
            counts=[p * a for p in positions],
            loc=loc,
            slot=slot,
        )

    # ------------------------------------------------------------------------------- losses
    def losses(
        self, pyramid: Pyramid, out: DenseOutput, image_list: ImageList, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        losses = self.refine_losses(out, targets)
        losses.update(self.s_losses(out, targets))
        if self.t_head is not None:
            t_losses, teacher = self.t_losses(pyramid, out, image_list, targets)
            losses.update(t_losses)
            if self.mimic_paths:
                losses["mimic"] = self.mimic_weight * self.mimic_loss(out, *teacher)
        elif self.external_teacher:
            rois, index, _, _ = self.sample_rois(out, image_list.image_sizes, targets)
            self.last_mimic_inputs = self.mimic_inputs(out, index, rois, image_list.image_sizes)
        return losses

    def refine_losses(self, out: DenseOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        cls_sum = out.objectness.sum() * 0.0
        reg_sum = out.refine_deltas.sum() * 0.0
        num_pos = 0
        for i, t in enumerate(targets):
            matched = _match(self.refine_matcher, t["boxes"], out.anchors)
            pos = matched >= 0
            valid = matched != Matcher.BETWEEN_THRESHOLDS
            cls_sum = cls_sum + sigmoid_focal_loss(
                out.objectness[i][valid], pos[valid].to(out.objectness.dtype), reduction="sum"
            )
            target = self.refine_coder.encode_single(t["boxes"][matched[pos]], out.anchors[pos])
            reg_sum = reg_sum + F.smooth_l1_loss(out.refine_deltas[i][pos], target, beta=1 / 9, reduction="sum")
            num_pos += int(pos.sum())
        norm = max(1, num_pos)
        return {"refine_cls": cls_sum / norm, "refine_reg": reg_sum / norm}

    def s_losses(self, out: DenseOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """S-head: labels on refined anchors, easy negatives filtered, hard negative mining."""
        cls_sum = out.cls.sum() * 0.0
        reg_sum = out.reg.sum() * 0.0
        num_pos = 0
        objectness = out.objectness.detach().sigmoid()
        for i, t in enumerate(targets):
            matched = _match(self.s_matcher, t["boxes"], out.refined[i])
            pos = matched >= 0
            neg = (matched == Matcher.BELOW_LOW_THRESHOLD) & (objectness[i] >= self.neg_filter)
            labels = torch.zeros_like(matched)
            labels[pos] = t["labels"][matched[pos]].to(labels.dtype)
            logits = out.cls[i]
            if self.s_cls_loss == "softmax":
                per_anchor = F.cross_entropy(logits, labels, reduction="none")
            else:
                onehot = torch.zeros_like(logits)
                pi = torch.where(pos)[0]
                onehot[pi, labels[pi] - 1] = 1.0
                per_anchor = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").sum(-1)
            n_pos = int(pos.sum())
            neg_loss = per_anchor[neg]
            k = min(neg_loss.numel(), int(self.neg_pos_ratio * max(n_pos, 1)))
            cls_sum = cls_sum + per_anchor[pos].sum() + neg_loss.topk(k).values.sum()
            target = self.box_coder.encode_single(t["boxes"][matched[pos]], out.refined[i][pos])
            reg_sum = reg_sum + F.l1_loss(out.reg[i][pos], target, reduction="sum")
            num_pos += n_pos
        norm = max(1, num_pos)
        return {"s_cls": cls_sum / norm, "s_reg": reg_sum / norm}

    def sample_rois(
        self, out: DenseOutput, image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """T-head RoIs per image: (clipped refined boxes, flat anchor indices, labels 0..K, matched
        GT boxes (zeros for negatives))."""
        rois, index, labels, gts = [], [], [], []
        objectness = out.objectness.detach()
        for i, t in enumerate(targets):
            boxes = box_ops.clip_boxes_to_image(out.refined[i], image_sizes[i])
            ok = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
            gt = t["boxes"]
            if gt.numel():
                iou, matched = box_ops.box_iou(gt, boxes).max(0)
            else:
                iou = torch.zeros(boxes.shape[0], device=boxes.device)
                matched = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
            pos = ok & (iou >= self.t_iou)
            role = torch.full_like(matched, -1)
            role[pos] = 1
            neg_pool = torch.where(ok & ~pos)[0]
            top = objectness[i][neg_pool].topk(min(self.t_candidates, neg_pool.numel())).indices
            role[neg_pool[top]] = 0
            pos_mask, neg_mask = self.t_sampler([role])
            keep = torch.where((pos_mask[0] | neg_mask[0]).bool())[0]
            lab = torch.zeros_like(keep)
            is_pos = pos[keep]
            if gt.numel():
                lab[is_pos] = t["labels"][matched[keep][is_pos]].to(lab.dtype)
                matched_gt = gt[matched[keep]]
            else:
                matched_gt = torch.zeros_like(boxes[keep])
            rois.append(boxes[keep])
            index.append(keep)
            labels.append(lab)
            gts.append(matched_gt)
        return rois, index, labels, gts

    def t_features(self, pyramid: Pyramid) -> dict[str, Tensor]:
        """The T-head's pyramid levels, finest first (P2..P6 staggered, P3..P7 otherwise)."""
        levels: dict[str, Tensor] = {}
        if pyramid.p2 is not None:
            levels["p2"] = pyramid.p2
        levels.update(pyramid)
        assert self.t_head is not None
        return {f"p{k}": levels[f"p{k}"] for k in self.t_head.levels}

    def t_losses(
        self, pyramid: Pyramid, out: DenseOutput, image_list: ImageList, targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], tuple[list[Tensor], Tensor, Tensor]]:
        """T-head losses and what the mimic needs: (per-image anchor indices, T logits, T reg feature)."""
        assert self.t_head is not None
        rois, index, labels, gts = self.sample_rois(out, image_list.image_sizes, targets)
        logits, deltas, reg_feat = self.t_head(self.t_features(pyramid), rois, image_list.image_sizes)
        lab = torch.cat(labels)
        pos = lab > 0
        t_cls = F.cross_entropy(logits, lab) if lab.numel() else logits.sum() * 0.0
        target = self.box_coder.encode_single(torch.cat(gts)[pos], torch.cat(rois)[pos])
        t_reg = F.l1_loss(deltas[pos], target, reduction="sum") / max(1, int(pos.sum()))
        return {"t_cls": t_cls, "t_reg": t_reg}, (index, logits, reg_feat)

    def mimic_loss(self, out: DenseOutput, index: list[Tensor], t_logits: Tensor, t_reg: Tensor) -> Tensor:
        """Unweighted dual-path mimic loss on a random ``mimic_samples`` subset of each image's
        T-head RoIs (``index``: flat anchor indices; T rows are the images' RoIs concatenated)."""
        inputs = self.mimic_inputs(out, index)
        rows = inputs.rows
        return self.mimic_from(inputs, t_logits[rows], t_reg[rows])

    def mimic_inputs(
        self, out: DenseOutput, index: list[Tensor], rois: list[Tensor] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> MimicInputs:
        """Draw the random mimic subset of each image's T-samples (``index``: flat anchor indices)
        and gather the S-side of the enabled paths there (see :class:`MimicInputs`)."""
        picks, images, anchors = [], [], []
        for i, idx in enumerate(index):
            pick = torch.randperm(idx.numel(), device=idx.device)[: self.mimic_samples]
            picks.append(pick)
            images.append(torch.full_like(pick, i))
            anchors.append(idx[pick])
        img, anc = torch.cat(images), torch.cat(anchors)
        s_cls = s_reg = None
        if "cls" in self.mimic_paths:
            s_cls = out.cls[img, anc]
        if "reg" in self.mimic_paths:  # the S-head's own per-anchor regression feature (t_hidden wide)
            flat = torch.cat([f.flatten(2) for f in out.reg_feats], 2).transpose(1, 2)  # (N, positions, A*t_hidden)
            s = flat[img, out.loc[anc]].view(anc.numel(), self.num_anchors, -1)
            s_reg = s[torch.arange(anc.numel(), device=anc.device), out.slot[anc]]
        return MimicInputs(index=list(index), pick=picks, s_cls=s_cls, s_reg=s_reg, zero=out.cls.sum() * 0.0,
                           rois=list(rois or []), image_sizes=list(image_sizes or []))

    def mimic_from(
        self, inputs: MimicInputs, t_logits: Tensor | None, t_reg: Tensor | None, *,
        similarity: str | None = None, paths: Sequence[str] | None = None,
    ) -> Tensor:
        """Unweighted dual-path mimic loss of ``inputs`` (the S-side) against T-side targets for
        the same rows: ``t_logits`` (sum B_i, K + 1) softmax-convention logits (background 0) and
        ``t_reg`` (sum B_i, t_hidden) features. ``similarity`` / ``paths`` default to the model's;
        ``paths`` must be among the model's ``mimic_paths``. T-side tensors are detached when
        ``detach_teacher``."""
        similarity = similarity or self.similarity
        paths = self.mimic_paths if paths is None else tuple(paths)
        if any(p not in self.mimic_paths for p in paths):
            raise ValueError(f"mimic paths {paths} must be among the model's mimic_paths {self.mimic_paths}")
        if self.detach_teacher:
            t_logits = t_logits.detach() if t_logits is not None else None
            t_reg = t_reg.detach() if t_reg is not None else None
        # the mimic arithmetic runs in float32 under any autocast (its inputs are promoted)
        with autocast_off(inputs.zero.device.type):
            total = inputs.zero.float()
            if "cls" in paths:
                assert inputs.s_cls is not None and t_logits is not None
                s, t = inputs.s_cls.float(), t_logits.float()
                if self.s_cls_loss == "sigmoid":
                    s, t = s.sigmoid(), t.softmax(-1)[:, 1:]
                total = total + mimic_similarity(s, t, similarity)
            if "reg" in paths:
                assert inputs.s_reg is not None and t_reg is not None
                total = total + mimic_similarity(inputs.s_reg.float(), t_reg.float(), similarity)
        return total

    # ---------------------------------------------------------------------------- inference
    @torch.no_grad()
    def postprocess(self, out: DenseOutput, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """S-head detections in transformed-image coordinates."""
        results = []
        k = self.num_classes
        for i, size in enumerate(image_sizes):
            boxes_all, scores_all, labels_all = [], [], []
            start = 0
            for count in out.counts:
                sl = slice(start, start + count)
                start += count
                logits = out.cls[i, sl]
                probs = logits.softmax(-1)[:, 1:] if self.s_cls_loss == "softmax" else logits.sigmoid()
                keep_anchor = out.objectness[i, sl].sigmoid() >= self.neg_filter
                scores = (probs * keep_anchor[:, None]).flatten()
                cand = torch.where(scores > self.score_thresh)[0]
                top = scores[cand].topk(min(self.topk_candidates, cand.numel())).indices
                cand = cand[top]
                anchor_idx, label = cand // k, cand % k + 1
                boxes = self.box_coder.decode_single(out.reg[i, sl][anchor_idx], out.refined[i, sl][anchor_idx])
                boxes_all.append(box_ops.clip_boxes_to_image(boxes, size))
                scores_all.append(scores[cand])
                labels_all.append(label)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results


def build_mimicdet(
    backbone_name: str,
    num_classes: int,
    *,
    fpn_channels: int = 64,
    min_size: int = 192,
    max_size: int = 192,
    anchor_scale: float = 4.0,
    staggered: bool = True,
    mimic_weight: float = 1.0,
    similarity: str = "cosine",
    mimic_paths: Sequence[str] = MIMIC_PATHS,
    t_head: bool | str = True,
    mimic_samples: int = 64,
    t_samples: int = 128,
    t_hidden: int = 1024,
    backbone_weights: WeightsEnum | str | None = None,
    trainable_layers: int = 5,
    **kwargs: Any,
) -> MimicDet:
    """Build a :class:`MimicDet` on a ResNet (``backbone_name``: resnet18/34/50/101/152).

    Args:
        num_classes: object classes K without background; labels are 1..K.
        fpn_channels: FPN width C (``model.backbone.out_channels``).
        min_size, max_size: ``GeneralizedRCNNTransform`` resolution.
        anchor_scale: base anchor side = ``anchor_scale * stride`` (4: 32 px on P3).
        staggered: T-head on P2..P6 (True) or P3..P7 (False, the ablation).
        mimic_weight: lambda of ``L_mimic`` (the ``mimic`` entry is already multiplied by it).
        similarity: ``"cosine"`` (``1 - cos``) or ``"l2"`` (mean squared error).
        mimic_paths: any of ``("cls", "reg")``; empty: T-head trained without mimic.
        t_head: True: own T-head on the shared backbone; False builds no T-head, no P2 and no
            mimic (the "S-head only" row); ``"external"`` builds no T-head and no P2 but records
            the mimic's student side for a separately trained teacher (KD term
            ``mimicdet_teacher``; the "separate teacher of the same depth" row; ``t_hidden`` must then be
            the teacher's box-head width, 1024 for torchvision's Faster R-CNN).
        mimic_samples: mimicked RoIs per image (random subset of the T-head's samples).
        t_samples: RoIs per image sampled for the T-head (or the external teacher); t_hidden: the
            T-head's fc width (paper 1024), the width of the reg-path mimic feature.
        backbone_weights: None (random init) or ResNet ImageNet weights (enum or name; internet).
        trainable_layers: with weights, trainable ResNet stages (0..5).
        **kwargs: further :class:`MimicDet` options (``aspect_ratios``, ``scales_per_octave``,
            ``s_cls_loss``, ``neg_filter``, ``neg_pos_ratio``, ``t_candidates``,
            ``t_positive_fraction``, ``detach_teacher``, ``detach_guidance``, ``score_thresh``,
            ``nms_thresh``, ``detections_per_img``, ``topk_candidates``, ...).
    """
    backbone = build_backbone(
        backbone_name, fpn_channels, with_p2=t_head is True and staggered, weights=backbone_weights,
        trainable_layers=trainable_layers,
    )
    return MimicDet(
        backbone,
        num_classes,
        min_size=min_size,
        max_size=max_size,
        anchor_scale=anchor_scale,
        staggered=staggered,
        t_head=t_head,
        mimic_weight=mimic_weight,
        similarity=similarity,
        mimic_paths=mimic_paths,
        mimic_samples=mimic_samples,
        t_samples=t_samples,
        t_hidden=t_hidden,
        **kwargs,
    )

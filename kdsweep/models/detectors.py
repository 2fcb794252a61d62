"""Torchvision detectors (RetinaNet, FCOS, Faster R-CNN) with FPN backbones, built from a ModelConfig.

Nothing here edits or copies torchvision: backbones come from ``torchvision.models`` and its
FPN extractors, detectors from the public ``RetinaNet`` / ``FCOS`` / ``FasterRCNN`` classes.

Conventions:

* **Classes.** ``num_classes`` counts object classes without background and dataset labels are
  contiguous ``1..K`` (as ``kdsweep.train.evaluation`` expects). Every arch is built with ``K + 1``
  outputs: Faster R-CNN needs index 0 for background; RetinaNet and FCOS (sigmoid classifiers)
  simply never see label 0, exactly like torchvision's COCO RetinaNet (91 outputs, index 0 unused).
  So labels and predictions mean the same thing for all three archs.
* **Levels.** RetinaNet and FCOS use P3..P7 (P6/P7 by ``LastLevelP6P7`` on the P5 *output*, as in
  torchvision's RetinaNet v1 and FCOS); Faster R-CNN uses P2..P6 (P6 = ``LastLevelMaxPool``).
  :func:`level_names` gives the canonical name ``p<k>`` (stride ``2**k``; ``2**k / upsample`` for
  a student whose deconvolution upsamples its maps, ``ModelConfig.upsample``) of each torchvision key.
* **Anchors** (``a = cfg.anchor_scale``, ``s`` = level stride): RetinaNet sizes
  ``a*s * (1, 2^(1/3), 2^(2/3))`` x ratios (0.5, 1, 2) as torchvision (a=4 gives its 32 px at P3);
  Faster R-CNN RPN one size ``a*s`` x 3 ratios; FCOS one reference box of side ``(a/4)*s``, so the
  default a=4 reproduces torchvision's FCOS (box = stride, scale ranges 0/64/128/256/512 px) and
  a=2 halves those ranges like it halves the anchors of the other two.
* **Weights.** ``None``: random init, trainable BatchNorm, every backbone layer trainable
  (torchvision's rule: ``trainable_backbone_layers`` only matters for trained weights).
  A local path: a checkpoint of this very architecture (raw state_dict or ``{"model": ...}``),
  BatchNorm stays trainable. ``torchvision:NAME``: a torchvision weights enum, either the
  backbone's ImageNet weights (e.g. ``ResNet50_Weights.IMAGENET1K_V1``) or whole-detector weights
  (e.g. ``RetinaNet_ResNet50_FPN_Weights.COCO_V1``: resnet50, fpn_channels 256, num_classes 90);
  these use FrozenBatchNorm2d in the backbone, as torchvision does, and need internet. With a path
  or torchvision weights, ``trainable_backbone_layers`` freezes the early stages as torchvision
  does (ResNet: 0..5, MobileNetV3: 0..6).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torchvision.models import get_model_weights, get_weight, mobilenet, resnet
from torchvision.models._api import WeightsEnum
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _mobilenet_extractor,
    _resnet_fpn_extractor,
)
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from kdsweep.config import ConfigError, ModelConfig
from kdsweep.models.cross_scale import UpsampledBackbone, feature_upsample

# Pyramid levels k (stride 2**k) of each arch: backbone levels C_k, then the extra block's.
PYRAMID: dict[str, tuple[int, ...]] = {
    "retinanet": (3, 4, 5, 6, 7),
    "fcos": (3, 4, 5, 6, 7),
    "fasterrcnn": (2, 3, 4, 5, 6),
}
# Backbone levels each arch takes from the backbone (the rest come from the FPN's extra block).
BACKBONE_LEVELS: dict[str, tuple[int, ...]] = {
    "retinanet": (3, 4, 5),
    "fcos": (3, 4, 5),
    "fasterrcnn": (2, 3, 4, 5),
}
TORCHVISION_PREFIX = "torchvision:"


# --------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class WeightsSource:
    """Where a model's initial weights come from (at most one field is set)."""

    backbone: WeightsEnum | None = None
    detector: WeightsEnum | None = None
    checkpoint: Path | None = None

    @property
    def pretrained(self) -> bool:
        return any(v is not None for v in (self.backbone, self.detector, self.checkpoint))


def parse_weights(cfg: ModelConfig) -> WeightsSource:
    """Resolve ``cfg.weights`` without downloading anything.

    Raises:
        ConfigError: unknown torchvision weights name, or a checkpoint path that does not exist.
    """
    if cfg.weights is None:
        return WeightsSource()
    if cfg.weights.startswith(TORCHVISION_PREFIX):
        name = cfg.weights[len(TORCHVISION_PREFIX):]
        try:
            enum = get_weight(name)
        except (ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(
                f"model.weights '{cfg.weights}' is not a torchvision weights name ({exc}); "
                "use e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1"
            ) from None
        if isinstance(enum, get_model_weights(cfg.backbone)):
            return WeightsSource(backbone=enum)
        return WeightsSource(detector=enum)
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.weights '{cfg.weights}' is not a file; give a checkpoint path, "
            "torchvision:NAME, or null"
        )
    return WeightsSource(checkpoint=path.resolve())


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """The state_dict in a local checkpoint (raw state_dict or ``{"model": state_dict}``).

    Raises:
        ConfigError: one line naming the file: unreadable, or no state_dict in it.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a config problem
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.weights '{path}' could not be read as a checkpoint: {reason}") from None
    state = obj["model"] if isinstance(obj, Mapping) and "model" in obj else obj
    if not isinstance(state, Mapping):
        raise ConfigError(f"model.weights '{path}' holds no state_dict (got {type(state).__name__})")
    return state


def load_checkpoint(model: nn.Module, path: str | Path, what: str | None = None) -> None:
    """Load a local checkpoint (raw state_dict or ``{"model": state_dict}``) into ``model``.

    BatchNorm's ``num_batches_tracked`` counters may be absent (checkpoints of FrozenBatchNorm2d
    models); every other key must match in name and shape. ``what`` names the model in errors
    (e.g. ``fasterrcnn resnet18``).

    Raises:
        ConfigError: one line naming the file, the mismatching keys and the fix.
    """
    load_state(model, read_checkpoint(path), str(path), what)


def load_state(model: nn.Module, state: Mapping[str, Any], origin: str, what: str | None = None) -> None:
    """Strictly load ``state`` into ``model`` (``num_batches_tracked`` may be absent).

    Raises:
        ConfigError: one line naming ``origin``, the mismatching keys and the fix.
    """
    check_state(model.state_dict(), state, origin, what)
    model.load_state_dict(state, strict=False)  # fully checked above; tolerates BN counters


def check_state(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any], origin: str, what: str | None = None,
                any_shape: frozenset[str] | set[str] = frozenset()) -> None:
    """Raise a one-line ConfigError unless ``given`` has the keys and shapes of ``expected``
    (``num_batches_tracked`` may be absent; keys in ``any_shape`` may have any shape), e.g.
    ``model.weights /x.pt: checkpoint does not match fasterrcnn resnet18 (40 missing, 12
    unexpected keys, e.g. 'rpn.head.conv.0.0.weight' (missing from the checkpoint)); use a checkpoint
    of this architecture``."""
    missing, unexpected, shaped = _mismatches(expected, given, any_shape)
    if not (missing or unexpected or shaped):
        return
    counts = f"{len(missing)} missing, {len(unexpected)} unexpected"
    counts += f", {len(shaped)} differently shaped keys" if shaped else " keys"
    example = (missing or unexpected or shaped)[0]
    raise ConfigError(
        f"model.weights {origin}: checkpoint does not match {what or 'the model'} ({counts}, e.g. {example}); "
        "use a checkpoint of this architecture (same arch, backbone, fpn_channels and num_classes) or weights: null"
    )


def _mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any],
                any_shape: frozenset[str] | set[str] = frozenset()) -> tuple[list[str], list[str], list[str]]:
    """Described missing, unexpected and differently shaped keys of ``given`` against ``expected``."""
    missing, shaped = [], []
    for key, value in expected.items():
        if key not in given:
            if not key.endswith("num_batches_tracked"):
                missing.append(f"'{key}' (missing from the checkpoint)")
        elif not isinstance(given[key], torch.Tensor) or (key not in any_shape and given[key].shape != value.shape):
            shape = tuple(getattr(given[key], "shape", ()))
            shaped.append(f"'{key}' (shape {shape} in the checkpoint, {tuple(value.shape)} in the model)")
    unexpected = [f"'{key}' (not in the model)" for key in given if key not in expected]
    return missing, unexpected, shaped


def check_checkpoint(cfg: ModelConfig) -> None:
    """Check ``cfg``'s local checkpoint (if any) against ``cfg``'s architecture. With
    ``cfg.num_classes`` set the model is built and the checkpoint loaded; with 0 (the dataset's
    count, unknown before the data is read) every key must match, and every shape that does not
    depend on the class count.

    Raises:
        ConfigError: as :func:`build_detector` (``model.weights ...: checkpoint does not match ...``).
    """
    import dataclasses

    source = parse_weights(cfg)
    if source.checkpoint is None:
        return
    if cfg.num_classes:
        build_detector(cfg, cfg.num_classes)
        return
    bare = dataclasses.replace(cfg, weights=None)
    one, two = build_detector(bare, 1).state_dict(), build_detector(bare, 2).state_dict()
    per_class = {key for key, value in one.items() if two[key].shape != value.shape}
    check_state(one, read_checkpoint(source.checkpoint), str(source.checkpoint), describe(cfg), per_class)


def describe(cfg: ModelConfig) -> str:
    """``arch backbone`` of a model config, for messages."""
    return f"{cfg.arch} {cfg.backbone}"


# ------------------------------------------------------------------------------------- backbones
def _with_fpn_width(backbone: BackboneWithFPN, channels: int, extra: ExtraFPNBlock) -> BackboneWithFPN:
    """torchvision's FPN extractors fix the FPN width at 256: rebuild the FPN ``channels`` wide."""
    in_channels = [block[0].in_channels for block in backbone.fpn.inner_blocks]
    backbone.fpn = FeaturePyramidNetwork(in_channels, channels, extra_blocks=extra)
    backbone.out_channels = channels
    return backbone


def _resnet_fpn(
    name: str, levels: tuple[int, ...], trainable: int | None, norm: Callable | None,
    weights: WeightsEnum | None,
) -> BackboneWithFPN:
    """ResNet C_k (k=2..5) is ``layer{k-1}``; ``trainable`` None means all 5 stages."""
    body = getattr(resnet, name)(weights=weights, norm_layer=norm or nn.BatchNorm2d)
    return _resnet_fpn_extractor(body, 5 if trainable is None else trainable, [k - 1 for k in levels])


def _mobilenet_fpn(
    name: str, levels: tuple[int, ...], trainable: int | None, norm: Callable | None,
    weights: WeightsEnum | None,
) -> BackboneWithFPN:
    """MobileNetV3 stages as torchvision counts them (0: stem .. 5: last conv, 6 in all):
    stage i<5 is the first block of stride ``2**(i+1)``; C5 is the last stage (stride 32)."""
    kwargs = {"norm_layer": norm} if norm is not None else {}  # default BN has MobileNet's eps
    body = getattr(mobilenet, name)(weights=weights, **kwargs)
    stages = [k - 1 if k < 5 else 5 for k in levels]
    return _mobilenet_extractor(body, True, 6 if trainable is None else trainable, stages)


BACKBONE_BUILDERS: dict[str, Callable[..., BackboneWithFPN]] = {
    "resnet18": partial(_resnet_fpn, "resnet18"),
    "resnet34": partial(_resnet_fpn, "resnet34"),
    "resnet50": partial(_resnet_fpn, "resnet50"),
    "resnet101": partial(_resnet_fpn, "resnet101"),
    "mobilenet_v3_large": partial(_mobilenet_fpn, "mobilenet_v3_large"),
    "mobilenet_v3_small": partial(_mobilenet_fpn, "mobilenet_v3_small"),
}


def build_backbone(cfg: ModelConfig, source: WeightsSource | None = None) -> BackboneWithFPN:
    """FPN backbone of ``cfg.arch`` (P3..P7 or P2..P6), ``cfg.fpn_channels`` wide.

    Output: OrderedDict of (N, fpn_channels, H/s, W/s) maps, keys '0', '1', ... then 'p6', 'p7'
    (RetinaNet/FCOS) or 'pool' (Faster R-CNN); see :func:`level_names`.
    """
    source = source or parse_weights(cfg)
    builder = BACKBONE_BUILDERS.get(cfg.backbone)
    if builder is None:
        raise ConfigError(f"model.backbone '{cfg.backbone}' is unknown; use one of {', '.join(BACKBONE_BUILDERS)}")
    if cfg.arch not in BACKBONE_LEVELS:
        raise ConfigError(f"model.arch '{cfg.arch}' is unknown; use one of {', '.join(ARCH_BUILDERS)}")
    from_torchvision = source.backbone is not None or source.detector is not None
    trainable = cfg.trainable_backbone_layers if source.pretrained else None
    norm = FrozenBatchNorm2d if from_torchvision else None
    try:
        backbone = builder(BACKBONE_LEVELS[cfg.arch], trainable, norm, source.backbone)
    except ValueError as exc:  # torchvision's range check of trainable layers
        raise ConfigError(f"model.trainable_backbone_layers: {exc}") from None
    c = cfg.fpn_channels
    extra = LastLevelMaxPool() if cfg.arch == "fasterrcnn" else LastLevelP6P7(c, c)
    return _with_fpn_width(backbone, c, extra)


# ------------------------------------------------------------------------------------ detectors
def _strides(arch: str) -> tuple[int, ...]:
    return tuple(2**k for k in PYRAMID[arch])


def _retinanet(backbone: BackboneWithFPN, cfg: ModelConfig, classes: int) -> nn.Module:
    """RetinaNet (Lin et al., ICCV 2017): 3 scales x 3 ratios per level."""
    sizes = tuple(tuple(cfg.anchor_scale * s * 2 ** (i / 3) for i in range(3)) for s in _strides("retinanet"))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = None
    if cfg.head_norm:  # torchvision's RetinaNet v2 head: GroupNorm in both towers
        norm = partial(nn.GroupNorm, head_groups(backbone.out_channels))
        head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], classes, norm_layer=norm)
    return RetinaNet(backbone, classes, min_size=cfg.min_size, max_size=cfg.max_size, anchor_generator=anchors,
                     head=head)


def head_groups(channels: int) -> int:
    """GroupNorm groups for a head tower of ``channels``: 32 as torchvision, fewer so that every
    group keeps at least 2 channels (one channel per group would normalise a 1x1 P7 map of a
    single image to zero, and PyTorch refuses it: "Expected more than 1 value per channel")."""
    return max(g for g in range(1, 33) if channels % g == 0 and channels // g >= 2) if channels >= 2 else 1


def fcos_head(channels: int, classes: int, num_convs: int = 4) -> FCOSHead:
    """torchvision's FCOS head (``num_convs`` conv-GroupNorm-ReLU blocks per tower, 4 as
    torchvision); its GroupNorm(32) is replaced by GroupNorm(:func:`head_groups`) when that
    differs (FPN widths below 64 or not multiples of 32; the sub-heads take a ``norm_layer``,
    FCOSHead does not). ScaleKD's assistant uses a shorter one on an FCOS student."""
    if head_groups(channels) == 32:
        return FCOSHead(channels, 1, classes, num_convs=num_convs)
    norm = partial(nn.GroupNorm, head_groups(channels))
    head = FCOSHead(32, 1, classes, num_convs=0)  # shell: box coder; both sub-heads replaced
    head.classification_head = FCOSClassificationHead(channels, 1, classes, num_convs=num_convs, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(channels, 1, num_convs=num_convs, norm_layer=norm)
    return head


def _fcos(backbone: BackboneWithFPN, cfg: ModelConfig, classes: int) -> nn.Module:
    """FCOS (Tian et al., ICCV 2019): one reference box of side (anchor_scale/4)*stride per point."""
    sizes = tuple((cfg.anchor_scale / 4 * s,) for s in _strides("fcos"))
    anchors = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
    head = fcos_head(backbone.out_channels, classes)
    return FCOS(backbone, classes, min_size=cfg.min_size, max_size=cfg.max_size, anchor_generator=anchors, head=head)


def _fasterrcnn(backbone: BackboneWithFPN, cfg: ModelConfig, classes: int) -> nn.Module:
    """Faster R-CNN + FPN (Ren et al. 2015; Lin et al. 2017): RPN with one size x 3 ratios per level;
    RoIAlign reads P2..P5 (torchvision's default '0'..'3'). ``cfg.rpn_proposals`` / ``cfg.roi_samples``
    override the RPN's post-NMS proposals (pre-NMS: twice that) and the R-CNN head's sampled RoIs."""
    sizes = tuple((cfg.anchor_scale * s,) for s in _strides("fasterrcnn"))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    extra: dict[str, int] = {}
    if cfg.rpn_proposals is not None:
        n = cfg.rpn_proposals
        extra.update(rpn_pre_nms_top_n_train=2 * n, rpn_pre_nms_top_n_test=2 * n,
                     rpn_post_nms_top_n_train=n, rpn_post_nms_top_n_test=n)
    if cfg.roi_samples is not None:
        extra["box_batch_size_per_image"] = cfg.roi_samples
    return FasterRCNN(backbone, classes, min_size=cfg.min_size, max_size=cfg.max_size, rpn_anchor_generator=anchors, **extra)


ARCH_BUILDERS: dict[str, Callable[[BackboneWithFPN, ModelConfig, int], nn.Module]] = {
    "retinanet": _retinanet,
    "fcos": _fcos,
    "fasterrcnn": _fasterrcnn,
}


def build_detector(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build a torchvision detector from ``cfg``.

    Args:
        cfg: the model config.
        num_classes: object classes without background (the dataset's); ``cfg.num_classes`` wins
            when > 0. The model has ``K + 1`` outputs and predicts labels ``1..K`` (module doc).
    Returns:
        A torchvision ``RetinaNet`` / ``FCOS`` / ``FasterRCNN``: in train mode
        ``model(images: list[(3, H, W)], targets: list[{"boxes": (n, 4) xyxy, "labels": (n,)}])``
        returns the loss dict, in eval mode ``model(images)`` the detections.
    Raises:
        ConfigError: unknown arch/backbone, bad class count or trainable layers, unknown
            weights name, missing or mismatching checkpoint.
    """
    classes = cfg.num_classes or num_classes
    if classes < 1:
        raise ConfigError(f"model.num_classes {classes} must be >= 1 (classes without background)")
    if cfg.arch == "mimicdet":
        return _mimicdet(cfg, classes)
    if cfg.options:
        raise ConfigError(f"model.options {dict(cfg.options)} apply only to arch mimicdet; remove them for {cfg.arch}")
    arch = ARCH_BUILDERS.get(cfg.arch)
    if arch is None:
        raise ConfigError(f"model.arch '{cfg.arch}' is unknown; use one of {', '.join(ARCH_BUILDERS)}, mimicdet")
    source = parse_weights(cfg)
    if cfg.upsample > 1:  # Li et al.'s cross-scale student: anchors keep their size per stride
        backbone = build_backbone(cfg, source)
        names = list(_probe(backbone))
        model = arch(UpsampledBackbone(backbone, cfg.upsample, names),
                     dataclasses.replace(cfg, anchor_scale=cfg.anchor_scale / cfg.upsample), classes + 1)
    else:
        model = arch(build_backbone(cfg, source), cfg, classes + 1)
    if source.checkpoint is not None:
        load_checkpoint(model, source.checkpoint, describe(cfg))
    elif source.detector is not None:  # needs internet; never used in tests
        load_state(model, source.detector.get_state_dict(progress=True), str(cfg.weights), describe(cfg))
    return model


def _mimicdet(cfg: ModelConfig, classes: int) -> nn.Module:
    """MimicDet (Lu et al., ECCV 2020) from :mod:`kdsweep.methods.mimicdet.model`; ``cfg.options`` go to
    its builder. Weights: None, the backbone's ImageNet weights (``torchvision:ResNet50_Weights...``;
    the paper trains from them: FrozenBatchNorm2d, ``trainable_backbone_layers`` trainable stages),
    or a local checkpoint of this architecture."""
    # Deliberately lazy: importing kdsweep.methods.mimicdet runs kdsweep.methods (the registry),
    # whose terms import this module's level names; a top-level import here would be circular.
    from kdsweep.methods.mimicdet.model import MimicDet, build_mimicdet

    if not cfg.backbone.startswith("resnet"):
        raise ConfigError(f"model.backbone '{cfg.backbone}': mimicdet is built on a ResNet; use resnet18/34/50/101")
    known = (set(inspect.signature(build_mimicdet).parameters) | set(inspect.signature(MimicDet).parameters)) - {
        "backbone_name", "num_classes", "backbone", "fpn_channels", "min_size", "max_size", "anchor_scale", "kwargs",
        "backbone_weights", "trainable_layers"}
    unknown = sorted(set(cfg.options) - known)
    if unknown:
        raise ConfigError(f"model.options.{unknown[0]} is unknown for mimicdet; known: {', '.join(sorted(known))}")
    source = parse_weights(cfg)
    if source.detector is not None:
        raise ConfigError(
            f"model.weights '{cfg.weights}' for mimicdet: use ImageNet weights of its backbone "
            f"(e.g. torchvision:{get_model_weights(cfg.backbone).__name__}.IMAGENET1K_V1), "
            "a local checkpoint of a mimicdet model, or null"
        )
    try:
        model = build_mimicdet(cfg.backbone, classes, fpn_channels=cfg.fpn_channels, min_size=cfg.min_size,
                               max_size=cfg.max_size, anchor_scale=cfg.anchor_scale, backbone_weights=source.backbone,
                               trainable_layers=cfg.trainable_backbone_layers, **dict(cfg.options))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.options: {exc}") from None
    if source.checkpoint is not None:
        load_checkpoint(model, source.checkpoint, describe(cfg))
    return model


# --------------------------------------------------------------------------------- level naming
_LEVEL_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[str, int]]]" = weakref.WeakKeyDictionary()
PROBE_SIZE = 256  # exact strides up to 256 (P8); our pyramids stop at P7


@torch.no_grad()
def _probe(backbone: nn.Module) -> dict[str, int]:
    """Stride of each backbone output key, from one eval-mode forward of a (1, 3, 256, 256) zero
    image (modes of every submodule are restored; BatchNorm statistics are untouched)."""
    param = next(backbone.parameters())
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        out = backbone(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, device=param.device, dtype=param.dtype))
    finally:
        for module, mode in modes.items():
            module.training = mode
    return {key: PROBE_SIZE // feat.shape[-1] for key, feat in out.items()}


def _levels(model: nn.Module) -> dict[str, tuple[str, int]]:
    backbone = model.backbone
    if backbone not in _LEVEL_CACHE:
        levels: dict[str, tuple[str, int]] = {}
        factor = feature_upsample(model)  # an upsampled P_k keeps its name p<k>, at stride 2**k / factor
        for key, stride in _probe(backbone).items():
            k = int(math.log2(stride * factor))
            if 2**k != stride * factor or any(name == f"p{k}" for name, _ in levels.values()):
                raise ValueError(f"backbone output '{key}' has stride {stride}: not a distinct power of 2")
            levels[key] = (f"p{k}", stride)
        _LEVEL_CACHE[backbone] = levels
    return _LEVEL_CACHE[backbone]


def level_names(model: nn.Module) -> dict[str, str]:
    """torchvision backbone key -> canonical level name ``p<k>`` (stride ``2**k``), in output order.

    E.g. RetinaNet: ``{'0': 'p3', '1': 'p4', '2': 'p5', 'p6': 'p6', 'p7': 'p7'}``; Faster R-CNN:
    ``{'0': 'p2', ..., '3': 'p5', 'pool': 'p6'}``. Strides are measured once per backbone (a probe
    forward, cached), so any torchvision-style detector with ``model.backbone`` works.
    """
    return {key: name for key, (name, _) in _levels(model).items()}


def level_strides(model: nn.Module) -> dict[str, int]:
    """Canonical level name -> stride in input pixels, e.g. ``{'p3': 8, ..., 'p7': 128}`` (halved
    for a student with ``upsample: 2``)."""
    return {name: stride for name, stride in _levels(model).values()}

"""Float32 islands inside mixed-precision steps.

Under autocast (float16 on GPUs, bfloat16 on the CPU) the detectors run in half precision, but
the statistics KD terms compute (SSIM's local variances, a softmax over a whole map, a mean of
squared differences over 10^5 values) lose too much there. The Distiller turns autocast off
around the terms and promotes their inputs with :func:`autocast_off` and :func:`to_float32`;
MimicDet's deformable convolution and mimic use them too. :func:`float32_decoding` keeps a
detector's box arithmetic (anchors, box targets, decoding) in float32, in training and in
evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["FLOAT32_OUTPUTS", "autocast_off", "float32_decoding", "to_float32"]

T = TypeVar("T")


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)``, or a no-op for device types without
    autocast (``meta``: the preflight builds and probes models there)."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def to_float32(obj: T) -> T:
    """``obj`` with every half-precision (float16/bfloat16) tensor in it cast to float32.

    Walks dicts (with the instance attributes of a dict subclass), lists, tuples and dataclass
    instances (a :class:`~kdsweep.kd.step.KDStep`, a MimicDet's recorded mimic inputs); modules,
    other tensors and other values are returned as they are (the same objects). A term's input
    under autocast comes out as it would in a float32 step, up to the rounding the half-precision
    forward already did; autograd flows through the cast.
    """
    if isinstance(obj, Tensor):
        return obj.float() if obj.dtype in (torch.float16, torch.bfloat16) else obj  # type: ignore[return-value]
    if isinstance(obj, dict):  # dict, OrderedDict, and subclasses with attributes (MimicDet's Pyramid.p2)
        out = type(obj)((k, to_float32(v)) for k, v in obj.items())
        extra = getattr(obj, "__dict__", None)
        if extra:
            out.__dict__.update({k: to_float32(v) for k, v in extra.items()})
        return out  # type: ignore[return-value]
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_float32(v) for v in obj)  # type: ignore[return-value]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_float32(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                   if f.init and not isinstance(getattr(obj, f.name), nn.Module)}
        return dataclasses.replace(obj, **changes)  # type: ignore[return-value]
    return obj


# Submodules whose outputs feed the box arithmetic (anchors, matching, box targets and decoding,
# NMS, rescaling). Under AMP, evaluation (:func:`kdsweep.train.engine.predict`) and training
# (:func:`kdsweep.train.engine.train_one_epoch`, on the student) cast their outputs to float32:
#   backbone                 every arch: its FPN maps set the anchors' dtype (torchvision's
#                            ``AnchorGenerator`` and MimicDet build anchors in ``feature_maps[0].dtype``)
#   head                     RetinaNet, FCOS: class logits, box deltas / (l, t, r, b), centerness
#   rpn.head                 Faster R-CNN: objectness, proposal deltas
#   roi_heads.box_predictor  Faster R-CNN: class logits, box deltas of the second stage
#   refine, s_head           MimicDet: objectness and refinement deltas; S-head logits and deltas
# The next layer of each (a convolution, or RoIAlign, which autocast runs in float32 anyway) casts a
# float32 input back to the autocast dtype, so this changes no arithmetic of the network itself.
FLOAT32_OUTPUTS: tuple[str, ...] = ("backbone", "head", "rpn.head", "roi_heads.box_predictor", "refine", "s_head")


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """``model``'s submodule at dotted ``path`` (e.g. ``rpn.head``), or None when it has none."""
    try:
        found = model.get_submodule(path)
    except AttributeError:
        return None
    return found if isinstance(found, torch.nn.Module) else None


@contextlib.contextmanager
def float32_decoding(model: torch.nn.Module) -> Iterator[list[str]]:
    """Within the block, the outputs of ``model``'s :data:`FLOAT32_OUTPUTS` submodules (those it
    has) are cast to float32 (forward hooks, removed on exit); yields the paths hooked. Autograd
    flows through the casts, so it serves training as well as evaluation.

    Why: torchvision's ``BoxCoder.decode_single`` casts the anchors to the dtype of the head's
    output, and ``AnchorGenerator`` makes the anchors in the dtype of the feature maps. Under
    autocast both are float16/bfloat16, so boxes are decoded in half precision: bfloat16 spaces
    its values 4 px apart between 512 and 1024 px (8 bits of mantissa), and boxes of an 800x1333
    input come out up to 8.2 px off a float32 decode of the same deltas (float16: about 2 px;
    measured in issue 24). Here the backbone and heads still run under autocast; the anchors, the
    decoding, the scores' sigmoid/softmax, NMS and the rescaling to the original image run in
    float32 (mmdetection's ``force_fp32`` on its box decoding; detectron2 evaluates wholly in
    float32). In training the same holds for the anchors' matching and the box-regression
    targets: a bfloat16 step's RetinaNet regression loss was 5.5 % off the float32 loss of the same
    head outputs, at 64x1333 (mmdetection's ``force_fp32`` on its losses).

    Raises:
        ValueError: ``model`` has none of those submodules (a detector this function does not know:
            its boxes could not be kept in float32).
    """
    model = getattr(model, "module", model)  # a DDP-wrapped detector
    hooked = [(path, module) for path in FLOAT32_OUTPUTS if (module := _submodule(model, path)) is not None]
    if not hooked:
        raise ValueError(
            f"AMP: {type(model).__name__} has none of the submodules {', '.join(FLOAT32_OUTPUTS)} "
            "whose outputs are cast to float32 before boxes are decoded; add its head's path to "
            "kdsweep.kd.precision.FLOAT32_OUTPUTS, or set train.amp: false"
        )
    handles = [module.register_forward_hook(lambda _m, _args, out: to_float32(out)) for _, module in hooked]
    try:
        yield [path for path, _ in hooked]
    finally:
        for handle in handles:
            handle.remove()

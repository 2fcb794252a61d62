"""Float32 islands inside mixed-precision steps.

Under autocast (float16 on GPUs, bfloat16 on the CPU) the detectors run in half precision, but
the statistics KD terms compute (SSIM's local variances, a softmax over a whole map, a mean of
squared differences over 10^5 values) lose too much there. The Distiller turns autocast off
around the terms and promotes their inputs with these two functions; MimicDet's deformable
convolution and mimic use them too.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TypeVar

import torch
from torch import Tensor, nn

__all__ = ["autocast_off", "to_float32"]

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

    Walks dicts, lists, tuples and dataclass instances (a :class:`~kdsweep.kd.step.KDStep`, a
    MimicDet's recorded mimic inputs); modules, other tensors and other values are returned as they
    are (the same objects). A term's input under autocast comes out as it would in a float32 step,
    up to the rounding the half-precision forward already did; autograd flows through the cast.
    """
    if isinstance(obj, Tensor):
        return obj.float() if obj.dtype in (torch.float16, torch.bfloat16) else obj  # type: ignore[return-value]
    if isinstance(obj, dict):  # dict, OrderedDict
        return type(obj)((k, to_float32(v)) for k, v in obj.items())  # type: ignore[return-value]
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_float32(v) for v in obj)  # type: ignore[return-value]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_float32(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                   if f.init and not isinstance(getattr(obj, f.name), nn.Module)}
        return dataclasses.replace(obj, **changes)  # type: ignore[return-value]
    return obj

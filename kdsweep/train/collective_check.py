"""A checking mode that makes a CPU run fail where NCCL would: host tensors in collectives.

NCCL (Ray Train's backend on GPUs) takes only CUDA tensors. On a CPU test machine the training
device *is* the host, so a stray ``.cpu()`` before an all-reduce, or a ``torch.tensor(...)``
made without ``device=``, goes unnoticed under gloo and breaks the first multi-GPU run. This
module tracks host provenance on the CPU and checks every ``torch.distributed`` call:

* A tensor is *marked* as living on the host on purpose when it is made by ``.cpu()``,
  ``.to("cpu")``, ``.numpy()``-style round trips (``torch.from_numpy``), or a factory
  (``torch.tensor``, ``torch.zeros``, ...) called without ``device=`` or with ``device="cpu"``.
  An op whose tensor inputs are all host tensors gives host tensors, like CPU ops do; an op that
  also reads a device tensor gives a device tensor, like a CUDA op with a 0-d CPU scalar does.
  ``.to(device)`` with a ``torch.device`` (the training device, whatever it is) clears the mark.
  Marks are ids of live tensors, not a subclass: they never reach checkpoints or pickles.
* :func:`guard` installs the tracking and wraps the collectives of ``torch.distributed``: a host
  tensor reaching one raises :class:`CollectiveDeviceError`; the pickling object collectives
  (``all_gather_object`` and friends) are refused outright (they stage through the current CUDA
  device and unpickle every rank's data; pack values into device tensors instead).

A worker runs under :func:`guard` when ``KDSWEEP_CHECK_COLLECTIVES=1`` is set in its
environment (the tests set it for their multi-worker runs); training code never imports this
module otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["CollectiveDeviceError", "ENV_FLAG", "guard", "is_host"]

ENV_FLAG = "KDSWEEP_CHECK_COLLECTIVES"

TENSOR_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce", "broadcast", "gather", "scatter",
    "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
)
OBJECT_COLLECTIVES = (
    "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
    "send_object_list", "recv_object_list",
)
FACTORIES = {
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand,
    torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.scalar_tensor, torch.from_numpy,
}


class CollectiveDeviceError(RuntimeError):
    """A host tensor (or a pickled object) reached a ``torch.distributed`` collective."""


class _Marks:
    """Ids of the live host tensors (a finaliser forgets each one when it is freed; no subclass,
    so marks never leak into checkpoints, pickles or ``type()`` checks)."""

    def __init__(self) -> None:
        self.ids: set[int] = set()

    def add(self, obj: Any) -> None:
        for t in _tensors(obj):
            key = id(t)
            if key not in self.ids:
                self.ids.add(key)
                weakref.finalize(t, self.ids.discard, key)

    def discard(self, obj: Any) -> None:
        for t in _tensors(obj):
            self.ids.discard(id(t))

    def __contains__(self, t: Any) -> bool:
        return isinstance(t, Tensor) and id(t) in self.ids


_MARKS: list[_Marks] = []  # the innermost active guard's marks


def is_host(t: Any) -> bool:
    """Whether ``t`` is a tensor marked as a host tensor by the active :func:`guard`."""
    return bool(_MARKS) and t in _MARKS[-1]


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _is_host_device(device: Any) -> bool:
    """A literal host device: the string ``"cpu"`` (a ``torch.device`` object is taken to be the
    training device, which is the CPU only in the test that simulates a GPU)."""
    return isinstance(device, str) and device.split(":")[0] == "cpu"


def _target_device(args: tuple, kwargs: dict) -> Any:
    if "device" in kwargs:
        return kwargs["device"]
    for arg in args[1:]:
        if isinstance(arg, (str, torch.device)):
            return arg
    return None


class _HostCopies(TorchFunctionMode):
    """Marks host copies and host-made tensors (see the module docstring)."""

    def __init__(self, marks: _Marks) -> None:
        super().__init__()
        self.marks = marks

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        copies_to_host = func is Tensor.cpu or (func is Tensor.to and _is_host_device(_target_device(args, kwargs)))
        if copies_to_host:
            if args and out is args[0]:  # on the CPU the "copy" is the tensor itself: mark a new
                out = out.view_as(out)  # alias, as a GPU would return a new host tensor
            self.marks.add(out)
        elif func is Tensor.to and _target_device(args, kwargs) is not None:
            if out in self.marks:  # a host tensor moved to the training device: a new,
                out = out.view_as(out)  # unmarked alias (on the CPU `.to` returned it as it was)
        elif func in FACTORIES:
            device = kwargs.get("device")
            if device is None or _is_host_device(device):
                self.marks.add(out)
        else:
            inputs = list(_tensors((args, kwargs)))
            if inputs and all(t in self.marks for t in inputs):
                self.marks.add(out)
        return out


def _check_args(name: str, args: tuple, kwargs: dict, marks: _Marks) -> None:
    for t in _tensors((args, kwargs)):
        if t in marks:
            raise CollectiveDeviceError(
                f"torch.distributed.{name} got a host tensor (made by .cpu(), .to('cpu') or a factory without "
                "device=); NCCL takes only tensors on the training device: create or keep it there"
            )


@contextlib.contextmanager
def guard() -> Iterator[dict[str, int]]:
    """Track host tensors and check every collective inside the block (see the module docstring).

    Yields a dict ``collective name -> calls seen``, for tests that want to know what ran.
    """
    seen: dict[str, int] = {}
    originals: dict[str, Callable] = {}
    marks = _Marks()

    def checked(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _check_args(name, args, kwargs, marks)
            seen[name] = seen.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    def refused(name: str) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            raise CollectiveDeviceError(
                f"torch.distributed.{name}: object collectives pickle through the current CUDA device and unpickle "
                "every rank's data; pack the values into a tensor on the training device instead"
            )

        return wrapper

    for name in TENSOR_COLLECTIVES + OBJECT_COLLECTIVES:
        if hasattr(dist, name):
            originals[name] = getattr(dist, name)
            setattr(dist, name, checked(name, originals[name]) if name in TENSOR_COLLECTIVES else refused(name))
    _MARKS.append(marks)
    try:
        with _HostCopies(marks):
            yield seen
    finally:
        _MARKS.remove(marks)
        for name, fn in originals.items():
            setattr(dist, name, fn)

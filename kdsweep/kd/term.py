"""The KD-term contract: what every distillation term is, takes and may ask for.

A KD term is an ``nn.Module`` subclass of :class:`KDTerm`:

* **one forward signature**: ``forward(step: KDStep) -> Tensor | dict[str, Tensor]``, the
  unweighted term (a dict gives named parts, each logged and weighted alike). ``step`` is what the
  term may look at of one training step (:class:`~kdsweep.kd.step.KDStep`): matched FPN maps
  (``step.aligned()``) and, when the term declares them, more;
* **a declaration of what it needs** (:attr:`KDTerm.needs`, a set of :class:`Need`; with
  :attr:`Need.MODULE_OUTPUTS`, the student submodules it reads, :attr:`KDTerm.taps`): the
  Distiller installs exactly the hooks that capture those, on the student and on the teacher,
  and nothing else;
* **optional hooks** for terms whose own modules train differently from the student:
  :meth:`KDTerm.own_optimizer` (e.g. ScaleKD's assistant has its own Adam) and
  :meth:`KDTerm.steps_at` (whether that optimizer steps at this point of training).

Terms are built by a **builder** with one signature, ``builder(spec: TermSpec) -> KDTerm``:
:class:`TermSpec` carries the config entry (name, params, adapter, levels) and the two built
detectors. The registry (:data:`kdsweep.methods.TERMS`) is a plain dict from the config's loss
name to its builder; nothing registers itself on import.

Every term computes in float32: the Distiller turns autocast off around the terms and promotes
their inputs (:func:`kdsweep.kd.precision.to_float32`).
"""

from __future__ import annotations

import abc
import enum
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from kdsweep.config import ConfigError

if TYPE_CHECKING:  # the step module builds on this one; the annotation only
    from kdsweep.kd.step import KDStep

__all__ = ["KDTerm", "Need", "TermSpec", "keyword_params", "reject_unknown"]


class Need(enum.Enum):
    """What a term reads of a training step beyond its matched FPN maps (``step.aligned()``)."""

    BODY = "body"
    """The last backbone stage of student and teacher (``step.student_body``, ``step.teacher_out.body``)."""
    TARGETS = "targets"
    """The student's transformed targets and image sizes (``step.targets``, ``step.image_sizes``)."""
    HEAD = "head"
    """The student's dense-head outputs and anchors (``step.head_outputs``, ``step.anchors``)."""
    PROPOSALS = "proposals"
    """A two-stage student's RPN proposals (``step.proposals``), with its image sizes."""
    TEACHER_LEVELS = "teacher_levels"
    """Every FPN level of the teacher (``step.teacher_feats``), not only the term's (to run its heads)."""
    MODULE_OUTPUTS = "module_outputs"
    """The outputs of the student's submodules the term names in :attr:`KDTerm.taps`, one per call
    (``step.module_outputs[path]``; a head tower's layer is called once per level). Each is a copy
    taken as the layer returns, so an in-place activation after it does not change it."""


@dataclass(frozen=True)
class TermSpec:
    """What a builder gets: one ``kd`` config entry and the two built detectors.

    Attributes:
        name: the entry's name in the step (``ssim``, or ``ssim_1`` when repeated).
        loss: the registry key (``ssim``).
        params: the entry's ``params`` (the builder rejects unknown keys, :func:`reject_unknown`).
        adapter: the entry's ``adapter``: true (learn a 1x1 conv per level), false, or ``"auto"``
            (one exactly when the widths the term compares differ:
            :func:`~kdsweep.kd.adapters.resolve_adapter`).
        levels: the canonical levels (``p3``..) the term compares, in student order.
        student, teacher: the built detectors (the teacher frozen).
        student_channels, teacher_channels: their FPN widths.
    """

    name: str
    loss: str
    student: nn.Module
    teacher: nn.Module
    student_channels: int
    teacher_channels: int
    levels: tuple[str, ...]
    adapter: bool | str = False
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_levels(self) -> int:
        return len(self.levels)


class KDTerm(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every KD term (see the module docstring for the contract)."""

    needs: ClassVar[frozenset[Need]] = frozenset()
    taps: tuple[str, ...] = ()
    """Dotted paths of student submodules whose outputs the term reads (with :attr:`Need.MODULE_OUTPUTS`)."""

    @abc.abstractmethod
    def forward(self, step: "KDStep") -> Tensor | dict[str, Tensor]:
        """The unweighted term (a scalar, or named scalar parts) of one training step."""

    def own_optimizer(self) -> torch.optim.Optimizer | None:
        """An optimizer of this term's own parameters, which the main optimizer then leaves out;
        None (the default): everything trains under the main optimizer."""
        return None

    def steps_at(self, progress: float) -> bool:
        """Whether :meth:`own_optimizer` steps at ``progress`` (the fraction of training done)."""
        return True


def keyword_params(fn: Callable[..., Tensor]) -> list[str]:
    """Names of ``fn``'s keyword-only parameters: what a feature term's ``params`` may set."""
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def reject_unknown(name: str, params: Mapping[str, Any] | Sequence[str], known: Sequence[str]) -> None:
    """Raise ``ConfigError`` naming the first key of ``params`` not in ``known`` (listed in order).

    Every KD term builder uses it, so an unknown ``kd.<name>.params.<key>`` reads the same for all.
    """
    for key in params:
        if key not in known:
            raise ConfigError(f"kd.{name}.params.{key} is unknown; known: {', '.join(known) if known else '(none)'}")

"""What a run trains, built from its typed config: the one builder every worker and the
preflight call.

A teacher's run is a run like any other: its config is the experiment with the teacher as the
student and no KD terms (:func:`kdsweep.config.teacher_experiment`), so nothing here branches on
a role.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kdsweep.config import ExperimentConfig, teacher_model
from kdsweep.models.detectors import build_detector, load_state
from kdsweep.train.distiller import Distiller, build_distiller

__all__ = ["build_model"]


def build_model(exp: ExperimentConfig, num_classes: int, teacher_state: Mapping[str, Any] | None = None) -> Distiller:
    """The Distiller of ``exp``: the student (built from ``exp.student`` at its resolution,
    :func:`~kdsweep.config.student_model`, its initial weights
    included) and, when ``exp.kd`` is set, its KD terms and the frozen teacher (built from
    ``exp.teacher`` at its resolution (:func:`~kdsweep.config.teacher_model`) without initial weights, then loaded with ``teacher_state``, the trained
    teacher's state_dict).

    ``num_classes`` is the dataset's class count (a model's own ``num_classes`` wins when set).
    :mod:`kdsweep.orchestrate.preflight` calls this very function before anything starts.

    Raises:
        ValueError: KD terms without teacher weights.
        ConfigError: what the builders reject (one line naming the field).
    """
    teacher = None
    if exp.kd:
        if teacher_state is None:
            raise ValueError("KD terms are configured but no teacher weights were given")
        teacher = build_detector(dataclasses.replace(teacher_model(exp), weights=None), num_classes)
        load_state(teacher, teacher_state, "teacher weights")
    return build_distiller(exp, num_classes, teacher)

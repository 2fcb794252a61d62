"""Tune over Train (kdsweep.sweep): which failed runs are restarted, and the one-line reasons."""

from __future__ import annotations

import ray.exceptions
from ray.train import ControllerError, WorkerGroupError

from kdsweep.sweep import classify_failure


class _Wrapped(Exception):
    """What Ray Train hands back for an exception raised in the training function: its text is
    the worker's traceback (Ray's UserExceptionWithTraceback)."""


def _traceback(line: str) -> _Wrapped:
    return _Wrapped(f"Traceback (most recent call last):\n  File \"train_loop.py\", line 9, in _run_worker\n{line}\n")


NAN = "kdsweep.engine.NonFiniteLossError: non-finite loss at epoch 1 step 0 (kd_l2=inf); lower the learning rate"


def test_a_lost_worker_is_restarted():
    kind, reason = classify_failure(WorkerGroupError("rank 1 died", {1: ray.exceptions.ActorDiedError()}))
    assert kind == "lost" and reason


def test_deterministic_failures_are_not_restarted_even_beside_a_lost_worker():
    for line in (NAN, "kdsweep.engine.TrialOutOfMemoryError: out of memory at epoch 3 step 0 (2 images per worker)",
                 "kdsweep.config.ConfigError: kd.ssim.params.alpha must be a number"):
        kind, reason = classify_failure(WorkerGroupError("x", {0: _traceback(line), 1: ray.exceptions.ActorDiedError()}))
        assert (kind, reason) == ("fatal", line)


def test_a_bug_in_the_training_code_is_not_restarted():
    kind, reason = classify_failure(WorkerGroupError("x", {0: _traceback("ZeroDivisionError: division by zero")}))
    assert (kind, reason) == ("fatal", "ZeroDivisionError: division by zero")


def test_a_controller_error_is_not_restarted_here():
    kind, _ = classify_failure(ControllerError(RuntimeError("placement group could not be scheduled")))
    assert kind == "fatal"

"""A run's checkpoint folder: what a worker writes every epoch and reads back on a restart.

Layout::

    model.pt      {"model": student state_dict}   (loadable as detector weights: a teacher's)
    state.pt      {"trainable", "optimizer", "scheduler", "scaler", "extra_optimizers", "epoch"}
    metrics.json  the epoch's numeric metrics (re-reported when a restarted run has nothing left)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from kdsweep.train.distiller import Distiller
from kdsweep.train.optim import Optimization

__all__ = ["MODEL_FILE", "METRICS_FILE", "STATE_FILE", "load_checkpoint", "read_metrics", "save_checkpoint",
           "student_weights_path", "write_metrics"]

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper, or the module itself."""
    return getattr(module, "module", module)


def save_checkpoint(directory: str, distiller: Distiller, optimization: Optimization, epoch: int) -> None:
    """Write ``model.pt`` (student state_dict, loadable as detector weights) and ``state.pt``."""
    torch.save({"model": distiller.student.state_dict()}, os.path.join(directory, MODEL_FILE))
    torch.save({"trainable": unwrap(distiller.trainable).state_dict(), **optimization.state_dict(), "epoch": epoch},
               os.path.join(directory, STATE_FILE))


def load_checkpoint(directory: str, distiller: Distiller, optimization: Optimization) -> int:
    """Restore from ``state.pt``; return the next epoch to run."""
    state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    unwrap(distiller.trainable).load_state_dict(state["trainable"])
    optimization.load_state_dict(state)
    return int(state["epoch"]) + 1


def write_metrics(directory: str, metrics: dict[str, Any]) -> None:
    """The epoch's numeric metrics as ``metrics.json`` beside the weights in a checkpoint."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    Path(directory, METRICS_FILE).write_text(json.dumps(numbers))


def read_metrics(directory: str) -> dict[str, Any]:
    """The metrics saved with a checkpoint ({} for checkpoints written before they were saved)."""
    path = Path(directory, METRICS_FILE)
    return json.loads(path.read_text()) if path.is_file() else {}


def student_weights_path(checkpoint_dir: str | Path) -> Path:
    """Path of the student weights file inside a checkpoint directory."""
    return Path(checkpoint_dir) / MODEL_FILE

"""Locations of the embedded defaults, all under ``KDSWEEP_HOME`` (default ``~/.kdsweep``).

Nothing is written into the source tree: generated data, the SQLite MLflow store with its
artifacts, and Ray storage all live here. Every path returned is absolute (Ray workers chdir).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def home() -> Path:
    """``$KDSWEEP_HOME`` or ``~/.kdsweep``, absolute, created on demand."""
    root = Path(os.environ.get("KDSWEEP_HOME") or Path.home() / ".kdsweep").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_version_key(path: Path, context: str) -> str:
    """20 hex digits naming this version of the file at ``path`` (its absolute path, size and
    modification time) in ``context`` (what else the cached result depends on): the key of the
    caches derived from a file, so that a new version of the file gets a new entry."""
    resolved = path.resolve()
    stat = resolved.stat()
    return hashlib.sha256(f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{context}".encode()).hexdigest()[:20]


def synth_data_dir(name: str = "synth") -> Path:
    """Folder of the embedded synthetic dataset."""
    return home() / "data" / name


def mlflow_db() -> Path:
    """SQLite file of the embedded MLflow store."""
    return home() / "mlflow" / "mlflow.db"


def mlflow_artifacts() -> Path:
    """Artifact root of the embedded MLflow store."""
    path = home() / "mlflow" / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def mlflow_uri() -> str:
    """``sqlite:///`` URI of the embedded MLflow store."""
    db = mlflow_db()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def ray_storage() -> Path:
    """Ray Train/Tune storage path (checkpoints, results)."""
    path = home() / "ray_results"
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Shared test settings."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is as fast and immune to other jobs on the CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlflow_serves(port: int, timeout: float = 120.0) -> bool:
    """Whether an MLflow server on 127.0.0.1:``port`` answers /health with OK within ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.read().decode().strip() == "OK":
                    return True
        except OSError:
            time.sleep(1)
    return False

"""Shared test settings."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is as fast and immune to other jobs on the CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


# --- a Ray instance of the test's own, stopped alone ------------------------------------------
# `ray stop --force` kills every Ray on the machine (a user's running ablation included), so the
# slow tests never call it. A test starts its nodes with `ray start --block` in sessions of their
# own and stops exactly those: their process groups, then any process that carries the test's
# marker (Ray's daemons and workers may leave the group or re-parent, but they inherit the
# environment) or names the test's own --temp-dir on its command line.

MARKER = "KDSWEEP_TEST_RAY"  # environment variable: the temp dir of the test's Ray instance


def _proc_bytes(pid: int, name: str) -> bytes:
    """``/proc/<pid>/<name>`` (NUL-separated), or b"" when the process is gone or not readable."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:  # gone, or another user's process (never ours)
        return b""


def _ancestors(pid: int) -> set[int]:
    """``pid`` and its ancestors (never to be signalled: pytest itself)."""
    seen = set()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        fields = _proc_bytes(pid, "stat").rsplit(b")", 1)
        pid = int(fields[1].split()[1]) if len(fields) == 2 else 0
    return seen


def ray_processes(temp_dir: str) -> list[int]:
    """PIDs of the live processes of the Ray instance whose root temp dir is ``temp_dir``: those
    whose environment has ``KDSWEEP_TEST_RAY=temp_dir`` or whose command line names ``temp_dir``
    (as a path or below it). Zombies and this process's ancestors are left out."""
    root = temp_dir.rstrip("/").encode()
    marker = f"{MARKER}={temp_dir}".encode()
    mine = _ancestors(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        pid = int(entry)
        stat = _proc_bytes(pid, "stat").rsplit(b")", 1)
        if len(stat) != 2 or stat[1].split()[0] in (b"Z", b"X"):
            continue
        cmdline = _proc_bytes(pid, "cmdline")
        named = re.search(re.escape(root) + rb"(/|\x00|$)", cmdline) is not None
        if named or marker in _proc_bytes(pid, "environ").split(b"\0"):
            found.append(pid)
    return found


class RayNodes:
    """The Ray nodes of one test, each a ``ray start --block`` in a session of its own, sharing the
    root temp dir ``temp_dir`` (short: unix socket paths are limited) and the marker variable.

    ``env()`` is the environment to give every process of the test that talks to this instance
    (it carries the marker, so that whatever Ray starts for it is found on ``stop``)."""

    def __init__(self, base_env: dict[str, str], log_dir: Path) -> None:
        # RAY_TMPDIR/ray is the head's --temp-dir: Ray's default temp dir for every process of the
        # test, where `ray start` writes the address a launch finds (runner.ray_start_address)
        base = tempfile.mkdtemp(prefix="r", dir="/tmp")
        self.temp_dir = f"{base}/ray"
        self._env = dict(base_env, **{MARKER: self.temp_dir, "RAY_TMPDIR": base})
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        return dict(self._env)

    def start(self, *args: str, timeout: float = 180.0) -> subprocess.Popen:
        """``ray start --block *args`` (``--temp-dir`` added for a head); returns once it printed
        "Ray runtime started."; raises with its output if it exits or times out first."""
        ray = Path(sys.executable).parent / "ray"
        cmd = [str(ray), "start", "--block", *args]
        if "--head" in args:
            cmd.append(f"--temp-dir={self.temp_dir}")
        log = self.log_dir / f"ray-start-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=self._env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append(proc)
        deadline = time.time() + timeout
        while "Ray runtime started." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"`{' '.join(cmd)}` did not start (exit {proc.poll()}):\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        return proc

    def stop(self, grace: float = 10.0) -> list[int]:
        """Stops this instance alone: SIGTERM to each node's process group (``ray start --block``
        then stops its node's processes), SIGKILL to the groups after ``grace`` s, then SIGTERM and
        SIGKILL to any process still carrying the marker or naming the temp dir. Returns the PIDs
        that survived all of it (none expected)."""
        for proc in reversed(self.procs):  # worker nodes first, the head last
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.time() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            left = ray_processes(self.temp_dir)
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while left and time.time() < deadline:
                time.sleep(0.2)
                left = ray_processes(self.temp_dir)
        return ray_processes(self.temp_dir)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def ray_instance(env: dict[str, str], log_dir: Path) -> Iterator[RayNodes]:
    """A Ray instance of the test's own (start its nodes with ``.start(...)``), stopped on exit
    without touching any other Ray on the machine; fails if any of its processes survive."""
    nodes = RayNodes(env, log_dir)
    try:
        yield nodes
    finally:
        survivors = nodes.stop()
    assert not survivors, f"processes of the test's Ray instance ({nodes.temp_dir}) survived its stop: {survivors}"

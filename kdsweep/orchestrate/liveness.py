"""Which launches are alive, and which one trains a teacher: both kept in the MLflow store, the one
thing every launch of a lab shares (one machine's launches, or a cluster's, through one server).

* **Heartbeat.** A launch tags its parent run with its launcher (``host:pid``) and, every
  :data:`BEAT_S` seconds, the time (:class:`Heartbeat`). A RUNNING parent is *live*
  (:func:`launch_alive`) while its heartbeat is under :data:`STALE_S` old and, on the
  launcher's own host, its process exists. A launcher killed with SIGKILL
  leaves its parent RUNNING, but not live: ``--resume`` takes it over, and never a live one.
* **Teacher claims.** Before training a teacher, a launch tags its parent ``kdsweep.claim.<hash>``
  with the claim's time (:func:`claim_teacher`). Of the live launches that claim a hash, the
  earliest claim (then the smaller run id) trains it; the others wait for its FINISHED teacher
  run (:func:`wait_for_claim`). Every claimant reads the claims only after its own is stored and
  :data:`SETTLE_S` has passed, so two launches that claim at once agree on one winner; a winner
  looks for the FINISHED teacher once more before training it (the previous holder may have
  finished and released its claim just then). A claim whose launcher died stops counting with
  its heartbeat: the next waiter claims the hash.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from kdsweep.report.tracking import Tracker

__all__ = ["BEAT_S", "STALE_S", "Heartbeat", "claim_or_reuse", "claim_teacher", "launch_alive", "release_claim",
           "wait_for_claim"]

TAG_LAUNCHER = "kdsweep.launcher"  # host:pid of the launcher process
TAG_HEARTBEAT = "kdsweep.heartbeat"  # seconds since the epoch, refreshed every BEAT_S
CLAIM_PREFIX = "kdsweep.claim."  # + teacher hash: the claim's time in ms

BEAT_S = 30.0
STALE_S = 120.0  # four beats missed: the launcher is gone (seen from another host)
SETTLE_S = 2.0  # after storing a claim, before reading the others'


def launcher_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def launch_alive(run: Any, now: float | None = None) -> bool:
    """Whether the launch of the parent ``run`` (an MLflow ``Run``) is still running: RUNNING, its
    heartbeat under :data:`STALE_S` old (``now``: the time to judge at), and on this host its
    launcher process exists (a launcher killed here is seen dead at once). A run of a version
    without the tags is never live."""
    if run.info.status != "RUNNING":
        return False
    tags = run.data.tags
    host, _, pid = tags.get(TAG_LAUNCHER, "").rpartition(":")
    if not host or not pid.isdigit():
        return False
    try:
        fresh = (now if now is not None else time.time()) - float(tags.get(TAG_HEARTBEAT, "0")) < STALE_S
    except ValueError:
        return False
    if host == socket.gethostname():  # the process itself answers at once, without waiting for STALE_S
        return fresh and (int(pid) == os.getpid() or _pid_alive(int(pid)))
    return fresh


def describe_launch(run: Any) -> str:
    """``launcher host:pid, heartbeat Ns ago`` of a parent run, for one-line messages."""
    tags = run.data.tags
    try:
        ago = f", heartbeat {time.time() - float(tags[TAG_HEARTBEAT]):.0f} s ago"
    except (KeyError, ValueError):
        ago = ""
    return f"launcher {tags.get(TAG_LAUNCHER, '?')}{ago}"


class Heartbeat:
    """Tags ``run_id`` with this launcher and keeps its heartbeat fresh from a daemon thread until
    :meth:`stop`; a failed beat (the MLflow server briefly away) is tried again at the next one."""

    def __init__(self, tracker: Tracker, run_id: str, every: float = BEAT_S) -> None:
        self.tracker, self.run_id, self.every = tracker, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdsweep-heartbeat", daemon=True)

    def beat(self) -> None:
        self.tracker.client.set_tag(self.run_id, TAG_HEARTBEAT, f"{time.time():.0f}")

    def start(self) -> Heartbeat:
        self.tracker.client.set_tag(self.run_id, TAG_LAUNCHER, launcher_id())
        self.beat()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat; the next one tries again
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def _claims(tracker: Tracker, key: str) -> list[Any]:
    """Live parent runs of any experiment of the store that claim teacher ``key``, winner first."""
    tag = f"{CLAIM_PREFIX}{key}"
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    runs = tracker.client.search_runs(experiments, filter_string=f"tags.`{tag}` != '' and attributes.status = 'RUNNING'",
                                      max_results=1000)
    live = [r for r in runs if launch_alive(r)]
    return sorted(live, key=lambda r: (int(r.data.tags[tag]) if r.data.tags[tag].isdigit() else 0, r.info.run_id))


def claim_teacher(tracker: Tracker, parent: str, key: str, settle: float = SETTLE_S) -> Any | None:
    """Claim the training of teacher ``key`` for the launch of ``parent``. Returns None when this
    launch holds the claim (it trains the teacher), else the parent run of the launch that holds it."""
    tracker.client.set_tag(parent, f"{CLAIM_PREFIX}{key}", str(int(time.time() * 1000)))
    time.sleep(settle)
    claims = _claims(tracker, key)
    if not claims or claims[0].info.run_id == parent:
        return None
    release_claim(tracker, parent, key)
    return claims[0]


def release_claim(tracker: Tracker, parent: str, key: str) -> None:
    """Drop this launch's claim on teacher ``key`` (trained, failed or lost to another launch)."""
    try:
        tracker.client.delete_tag(parent, f"{CLAIM_PREFIX}{key}")
    except Exception:  # noqa: BLE001 - not set (already released)
        pass


def _recheck(tracker: Tracker, parent: str, key: str, ready: Callable[[], Any | None]) -> Any | None:
    """After winning a claim: ``ready()`` once more. The launch that trained the teacher may have
    ended its FINISHED run and released its claim between the last look and this claim; then its
    teacher is taken and this claim dropped, instead of training the teacher a second time."""
    found = ready()
    if found is not None:
        release_claim(tracker, parent, key)
    return found


def claim_or_reuse(tracker: Tracker, parent: str, key: str, ready: Callable[[], Any | None],
                   settle: float = SETTLE_S) -> tuple[str, Any | None]:
    """One look, without waiting: ``("reuse", ready())`` when the teacher is there (before or just
    after claiming it), ``("train", None)`` when this launch holds the claim, ``("wait", holder)``
    when another live launch holds it."""
    found = ready()
    if found is not None:
        return "reuse", found
    holder = claim_teacher(tracker, parent, key, settle)
    if holder is not None:
        return "wait", holder
    found = _recheck(tracker, parent, key, ready)
    return ("reuse", found) if found is not None else ("train", None)


def wait_for_claim(tracker: Tracker, parent: str, key: str, ready: Callable[[], Any | None],
                   poll: float = 10.0, settle: float = SETTLE_S) -> Any | None:
    """Wait while another live launch trains teacher ``key``. Returns ``ready()`` (the teacher,
    reused) as soon as it gives one, or None once this launch holds the claim itself: the other
    launch ended without a FINISHED teacher, or died. Says once, in one line, whom it waits for."""
    told = None
    while True:
        found = ready()
        if found is not None:
            return found
        holder = claim_teacher(tracker, parent, key, settle)
        if holder is None:
            return _recheck(tracker, parent, key, ready)
        if told != holder.info.run_id:
            told = holder.info.run_id
            print(f"kdsweep: teacher {key} is being trained by the launch of run {holder.info.run_id} "
                  f"({describe_launch(holder)}); waiting for it", flush=True)
        time.sleep(poll)

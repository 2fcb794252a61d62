"""Launch liveness and teacher claims (kdsweep.orchestrate.liveness), on an MLflow store of the test's
own: a launcher killed with SIGKILL is not live, a live one is never taken over by --resume, and of
launches that claim one teacher at the same moment exactly one trains it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kdsweep.config import ConfigError
from kdsweep.orchestrate import liveness
from kdsweep.orchestrate.launch import resumable
from kdsweep.orchestrate.liveness import (
    TAG_HEARTBEAT,
    TAG_LAUNCHER,
    Heartbeat,
    claim_teacher,
    launch_alive,
    release_claim,
    wait_for_claim,
)
from kdsweep.report.tracking import Tracker

TAGS = {"kdsweep.role": "ablation", "kdsweep.space": "s", "kdsweep.preset": "smoke"}


@pytest.fixture()
def tracker(tmp_path: Path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "kdsweep-test")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _parent(tracker: Tracker, launcher: str | None = None, beat: float | None = None) -> str:
    run_id = tracker.start_run("launch", tags={**TAGS, "kdsweep.tune_name": "t"})
    if launcher is not None:
        tracker.client.set_tag(run_id, TAG_LAUNCHER, launcher)
        tracker.client.set_tag(run_id, TAG_HEARTBEAT, f"{beat if beat is not None else time.time():.0f}")
    return run_id


def test_a_launch_is_live_while_its_launcher_runs_and_beats(tracker: Tracker) -> None:
    me = _parent(tracker)
    beat = Heartbeat(tracker, me, every=0.2).start()
    try:
        assert launch_alive(tracker.client.get_run(me))
    finally:
        beat.stop()
    host = liveness.socket.gethostname()
    killed = _parent(tracker, f"{host}:{_dead_pid()}")  # SIGKILLed: RUNNING, a fresh beat, no process
    assert not launch_alive(tracker.client.get_run(killed))
    away = _parent(tracker, "other-host:4242")
    assert launch_alive(tracker.client.get_run(away))  # another host: its heartbeat decides
    assert not launch_alive(tracker.client.get_run(away), now=time.time() + liveness.STALE_S + 1)
    assert not launch_alive(tracker.client.get_run(_parent(tracker)))  # no tags (older versions): never live
    tracker.end_run(away, "KILLED")
    assert not launch_alive(tracker.client.get_run(away))


def test_resume_never_takes_over_a_live_launch_and_takes_a_killed_one(tracker: Tracker) -> None:
    host = liveness.socket.gethostname()
    killed = _parent(tracker, f"{host}:{_dead_pid()}")
    assert resumable(tracker, TAGS, "s [smoke]").info.run_id == killed
    live = _parent(tracker, f"{host}:{liveness.os.getpid()}")  # newer, and its launcher runs
    with pytest.raises(ConfigError) as err:
        resumable(tracker, TAGS, "s [smoke]")
    message = str(err.value)
    assert "\n" not in message and live in message and "still running" in message and f"{host}:" in message


def test_of_launches_claiming_one_teacher_at_once_exactly_one_trains_it(tracker: Tracker) -> None:
    parents = [_parent(tracker, f"{liveness.socket.gethostname()}:{liveness.os.getpid()}") for _ in range(3)]
    holders: dict[str, object] = {}

    def claim(parent: str) -> None:
        holders[parent] = claim_teacher(Tracker(tracker.uri, "kdsweep-test"), parent, "abc", settle=0.5)

    threads = [threading.Thread(target=claim, args=(p,)) for p in parents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [p for p, holder in holders.items() if holder is None]
    assert len(winners) == 1
    assert all(holder.info.run_id == winners[0] for holder in holders.values() if holder is not None)
    # a claim on another teacher is another claim
    assert claim_teacher(tracker, parents[0] if parents[0] not in winners else parents[1], "def", settle=0) is None


def test_a_waiter_reuses_the_finished_teacher_or_claims_it_when_the_trainer_died(tracker: Tracker) -> None:
    host = liveness.socket.gethostname()
    trainer = _parent(tracker, f"{host}:{liveness.os.getpid()}")
    waiter = _parent(tracker, f"{host}:{liveness.os.getpid()}")
    assert claim_teacher(tracker, trainer, "abc", settle=0) is None
    calls = []

    def ready() -> str | None:  # the trainer's teacher run is FINISHED at the third look
        calls.append(1)
        if len(calls) == 3:
            release_claim(tracker, trainer, "abc")
            return "teacher weights"
        return None

    assert wait_for_claim(tracker, waiter, "abc", ready, poll=0.01, settle=0) == "teacher weights"
    # the trainer's launcher died (SIGKILL) with its claim: the waiter takes the claim, does not wait forever
    dead = _parent(tracker, f"{host}:{_dead_pid()}")
    tracker.client.set_tag(dead, f"{liveness.CLAIM_PREFIX}xyz", "1")
    start = time.time()
    assert wait_for_claim(tracker, waiter, "xyz", lambda: None, poll=0.01, settle=0) is None
    assert time.time() - start < 10
    assert tracker.client.get_run(waiter).data.tags[f"{liveness.CLAIM_PREFIX}xyz"]


def test_a_teacher_finished_just_before_the_waiter_claims_it_is_reused_not_trained_again(tracker: Tracker) -> None:
    """The trainer ends its FINISHED run and drops its claim right after the waiter's last look:
    the waiter then wins the claim, and must take the teacher rather than train it a second time
    (two FINISHED teachers of one hash, seen once in three runs of two launches at once)."""
    host = liveness.socket.gethostname()
    trainer = _parent(tracker, f"{host}:{liveness.os.getpid()}")
    waiter = _parent(tracker, f"{host}:{liveness.os.getpid()}")
    assert claim_teacher(tracker, trainer, "abc", settle=0) is None
    looks = []

    def ready() -> str | None:
        looks.append(1)
        if len(looks) == 1:  # the trainer finishes just after this look
            release_claim(tracker, trainer, "abc")
            return None
        return "teacher weights"

    assert wait_for_claim(tracker, waiter, "abc", ready, poll=0.01, settle=0) == "teacher weights"
    assert f"{liveness.CLAIM_PREFIX}abc" not in tracker.client.get_run(waiter).data.tags  # its claim dropped
    looks.clear()
    other = _parent(tracker, f"{host}:{liveness.os.getpid()}")
    assert claim_teacher(tracker, trainer, "abc", settle=0) is None
    assert liveness.claim_or_reuse(tracker, other, "abc", ready, settle=0) == ("reuse", "teacher weights")

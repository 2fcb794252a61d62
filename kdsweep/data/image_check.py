"""Checking many image files fast: headers only or a full decode, in parallel, with progress.

The files are checked by a pool of threads: Pillow releases the GIL while it decodes and while the
file is read, so threads decode in parallel, with no process to start (a process pool re-imports
the launcher's main module in every process: seconds of torch, Ray and MLflow imports; measured by
``benchmarks/bench_loader.py``). The checks per file are those of ``kdsweep data check``:

* ``decode=False`` (what a launch does): the file exists and its header gives a size;
* ``decode=True`` (``kdsweep data check``'s default): the whole file decodes, at 1/8 scale where
  the format allows it, so a truncated JPEG is caught as well.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from collections.abc import Callable, Sequence

from PIL import Image

SERIAL_BELOW = 2000  # images; fewer are checked on the calling thread
CHUNK = 64

Result = tuple[int, int] | str
"""``(width, height)`` of a readable image, else the reason (``missing`` or the decoder's error class)."""


def check_one(path: str, decode: bool) -> Result:
    """Size of the image at ``path`` as its header (or full decode) gives it, or why it failed."""
    if not os.path.isfile(path):
        return "missing"
    try:
        with Image.open(path) as handle:
            size = handle.size
            if decode:
                # verify() alone misses truncated JPEGs; decoding (at 1/8 scale where the format
                # allows it) reads all the data, so a cut-off file is caught here, not mid-training
                handle.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                handle.load()
    except Exception as exc:  # noqa: BLE001 - any decoder error means unreadable
        return exc.__class__.__name__
    return size


def _check_chunk(paths: Sequence[str], decode: bool) -> list[Result]:
    return [check_one(p, decode) for p in paths]


def printer(label: str, every_s: float = 5.0, min_total: int = SERIAL_BELOW) -> Callable[[int, int], None]:
    """A progress callback that prints ``label: done/total images`` to stderr at most every
    ``every_s`` seconds, and at the end; silent for fewer than ``min_total`` images."""
    last = [time.monotonic()]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if total >= min_total and (done == total or now - last[0] >= every_s):
            last[0] = now
            print(f"{label}: {done:,}/{total:,} images checked", file=sys.stderr, flush=True)

    return show


def check_images(paths: Sequence[str], *, decode: bool, workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[Result]:
    """:func:`check_one` of every path, in order. ``workers`` threads (default: every CPU of this
    machine) share the work in chunks once there are :data:`SERIAL_BELOW` paths or more."""
    total = len(paths)
    workers = workers or os.cpu_count() or 1
    results: list[Result] = []
    if total < SERIAL_BELOW or workers == 1:
        for i, path in enumerate(paths):
            results.append(check_one(path, decode))
            if progress is not None and ((i + 1) % CHUNK == 0 or i + 1 == total):
                progress(i + 1, total)
        return results
    chunks = [paths[i:i + CHUNK] for i in range(0, total, CHUNK)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdsweep-image-check") as pool:
        done = 0
        for part in pool.map(_check_chunk, chunks, [decode] * len(chunks)):
            results.extend(part)
            done += len(part)
            if progress is not None:
                progress(done, total)
    return results

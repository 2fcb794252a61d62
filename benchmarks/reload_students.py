"""Every student of an ablation, exported and reloaded, scores the AP its run logged.

For each FINISHED student trial (child run) of a parent run: ``kdsweep export RUN --out FILE``
(the logged ``student`` model, or the trial's last checkpoint for runs of earlier versions), then,
in a fresh Python process, ``kdsweep.load_student(FILE)`` evaluated on the run's own validation set
(its ``config.json``), with its inference parameter count. Prints one Markdown row per student and
the largest AP gap.

::

    python benchmarks/reload_students.py PARENT_RUN [--tracking-uri URI] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVALUATE = r"""
import json, sys
import kdsweep
from kdsweep.export import evaluate_student
from kdsweep.report.throughput import count_inference_params

model = kdsweep.load_student(sys.argv[1])
stats = evaluate_student(model, json.loads(open(sys.argv[2]).read()))
print(json.dumps({"AP": stats["AP"], "params_M": count_inference_params(model) / 1e6}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parent", help="the ablation's parent run id")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: the embedded one under KDSWEEP_HOME)")
    parser.add_argument("--out", help="folder of the exported files (default: a temporary folder)")
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient

    from kdsweep.export import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    parent = client.get_run(args.parent)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{args.parent}'")
    out = Path(args.out or tempfile.mkdtemp(prefix="kdsweep-reload-"))
    out.mkdir(parents=True, exist_ok=True)
    print("| trial | AP logged | AP reloaded | gap | params (M) |\n|---|---|---|---|---|", flush=True)
    gaps = []
    for child in sorted(children, key=lambda c: c.info.run_name):
        if child.info.status != "FINISHED" or child.data.tags.get("kdsweep.role") != "student":
            continue
        run_id = child.info.run_id
        target = out / f"{run_id[:8]}.pt"
        export = subprocess.run([sys.executable, "-m", "kdsweep.cli", "export", run_id, "--out", str(target),
                                 "--tracking-uri", uri], capture_output=True, text=True)
        if export.returncode:
            print(f"| {child.info.run_name} | export failed: {export.stderr.strip()[-200:]} | | | |", flush=True)
            continue
        config = client.download_artifacts(run_id, "config.json", str(out / run_id[:8]))
        done = subprocess.run([sys.executable, "-c", EVALUATE, str(target), config], capture_output=True, text=True)
        if done.returncode:
            print(f"| {child.info.run_name} | evaluation failed: {done.stderr.strip()[-200:]} | | | |", flush=True)
            continue
        got = json.loads(done.stdout.strip().splitlines()[-1])
        logged = child.data.metrics["AP"]
        gaps.append(abs(logged - got["AP"]))
        print(f"| {child.info.run_name} | {logged:.3f} | {got['AP']:.3f} | {gaps[-1]:.2g} | {got['params_M']:.2f} |", flush=True)
    print(f"\n{len(gaps)} student(s) reloaded; largest AP gap {max(gaps, default=float('nan')):.2g}")
    return 0 if gaps else 1


if __name__ == "__main__":
    sys.exit(main())

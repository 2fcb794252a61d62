"""``kdsweep`` command line: ``data`` (synth, check, convert), ``ablation``, ``sweep``, ``ui``, ``table``, ``export``.

Errors a user can fix (bad config, bad data) print one line and exit non-zero; no traceback.

The commands' modules are imported inside the functions that run them, deliberately: importing
the launchers brings torch, Ray and MLflow (about 11 s on the 2-core test machine, against 0.06 s
for this module), which ``kdsweep --help``, ``kdsweep ui`` and ``kdsweep data`` never need.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from kdsweep import paths
from kdsweep.config import ConfigError


def _ablation(args: argparse.Namespace) -> int:
    from kdsweep.orchestrate.ablation import run_ablation

    return run_ablation(args.space, args.rest, prog="kdsweep ablation")


def _sweep(args: argparse.Namespace) -> int:
    from kdsweep.orchestrate.search import run_sweep

    return run_sweep([args.space, *args.rest], prog="kdsweep sweep")


def _ui(args: argparse.Namespace) -> int:
    """Serve the MLflow UI for the embedded store (or ``--tracking-uri``) on 127.0.0.1.

    ``mlflow ui`` runs in a process group of its own (with its job runner and huey consumers);
    SIGTERM or SIGINT to this command stops that whole group, so nothing is left serving."""
    uri = args.tracking_uri or paths.mlflow_uri()
    cmd = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri,
        "--default-artifact-root", paths.mlflow_artifacts().as_uri(),
        "--host", args.host, "--port", str(args.port),
        # one server process: a local UI needs no more, and uvicorn's supervisor of several
        # restarts workers that boot slowly (on a 2-core machine busy training, forever)
        "--workers", "1",
    ]
    base = f"http://{args.host}:{args.port}"
    print(f"kdsweep: MLflow UI for {uri} at {base}", flush=True)
    runs = runs_url(uri, base, args.experiment)
    if runs:
        print(f"kdsweep: the runs of {runs[0]!r} (model-training view): {runs[1]}", flush=True)
    proc = subprocess.Popen(cmd, env=dict(os.environ), start_new_session=True)

    def stop(signum: int, frame: object) -> None:
        _stop_group(proc)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if runs and args.open:
            import webbrowser

            webbrowser.open(runs[1])
        return proc.wait()
    finally:
        _stop_group(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def runs_url(uri: str, base: str, experiment: str | None = None) -> tuple[str, str] | None:
    """``(experiment name, URL)`` of the runs view of ``experiment`` (default: the most recently
    updated experiment other than MLflow's Default) in model-training mode, or None when the store
    has none. MLflow 3's UI opens an experiment on its GenAI overview unless the URL asks for
    ``workflowType=machine_learning`` (its ``experimentPageTabbed`` route, tab ``runs``)."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        found = ([client.get_experiment_by_name(experiment)] if experiment else
                 [e for e in client.search_experiments(order_by=["last_update_time DESC"]) if e.name != "Default"][:1])
    except Exception:  # noqa: BLE001 - a store the UI can still serve; the link is a convenience
        return None
    if not found or found[0] is None:
        return None
    return found[0].name, f"{base}/#/experiments/{found[0].experiment_id}/runs?workflowType=machine_learning"


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to ``proc``'s whole process group; SIGKILL to whatever of it is left once ``proc``
    has exited (or ``grace`` seconds have passed): mlflow's job runner and huey consumers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 2.0  # the others had the same SIGTERM; a moment to act on it
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _table(args: argparse.Namespace) -> int:
    from kdsweep.report.compare import run_table

    return run_table(args)


def _export(args: argparse.Namespace) -> int:
    from kdsweep.export import run_export

    return run_export(args)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """``kdsweep export``: the distilled student of a trial run as a file (docs/export.md)."""
    exp = sub.add_parser("export", help="write the distilled student of a finished trial run (pt, torchscript or onnx)")
    exp.add_argument("run_id", metavar="RUN_ID", help="a finished trial's run id; or an ablation's parent run id with --row")
    exp.add_argument("--row", metavar="LABEL", help="with a parent run: take this row's best seed (by the ablation's metric)")
    exp.add_argument("--out", metavar="FILE", help="the file to write (default: <row>-s<seed>-<run>.<ext> in this folder)")
    exp.add_argument("--format", choices=["pt", "torchscript", "onnx"], default="pt",
                     help="pt (for kdsweep.load_student), torchscript or onnx (default: pt)")
    exp.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                     help="onnx: the fixed input size (default: the model's min_size, square)")
    exp.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else the embedded SQLite under KDSWEEP_HOME)")
    exp.add_argument("--storage-path", metavar="PATH",
                     help="a trial that finished before kdsweep logged models is read from its last checkpoint "
                          "here (its launch's --storage-path; default: KDSWEEP_HOME/ray_results)")
    exp.add_argument("--register", metavar="NAME", help="also register the run's model in MLflow's registry as a new version of NAME")
    exp.set_defaults(func=_export)


def build_parser() -> argparse.ArgumentParser:
    from kdsweep.data.cli import register

    parser = argparse.ArgumentParser(prog="kdsweep", description="Knowledge distillation sweeps for object detectors")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    abl = sub.add_parser("ablation", help="run an ablation search space (see launch/ablation_*.py)")
    abl.add_argument("space", help="search-space YAML")
    abl.add_argument("rest", nargs=argparse.REMAINDER, help="launcher options (--preset, --tracking-uri, ...)")
    abl.set_defaults(func=_ablation)
    swp = sub.add_parser("sweep", help="run a search-space file as a Tune search (Optuna/ASHA); --dry-run to check it")
    swp.add_argument("space", help="search-space YAML")
    swp.add_argument("rest", nargs=argparse.REMAINDER, help="options: --num-samples, --dry-run, --preset, --tracking-uri, ...")
    swp.set_defaults(func=_sweep)
    ui = sub.add_parser("ui", help="serve the MLflow UI of the embedded store on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ui.add_argument("--tracking-uri", help="another MLflow backend store URI")
    ui.add_argument("--experiment", help="the experiment whose runs URL to print (default: the most recently updated)")
    ui.add_argument("--open", action="store_true", help="open that URL in a browser")
    ui.set_defaults(func=_ui)
    table = sub.add_parser("table", help="the ablation tables of finished parent runs, rebuilt from MLflow, side by side")
    table.add_argument("parents", nargs="+", metavar="PARENT_RUN", help="parent run ids of finished ablations")
    table.add_argument("--tracking-uri", help="the MLflow store (default: the embedded SQLite under KDSWEEP_HOME)")
    table.add_argument("--out", help="also write the table to this .md or .parquet file")
    table.set_defaults(func=_table)
    _add_export(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"kdsweep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

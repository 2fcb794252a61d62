"""Malformed input across every entry point (issue 6, section 2).

Each case is one bad search-space file, dataset or command-line option given to ``kdsweep sweep
--dry-run``, the ablation launcher (``run_ablation``) or ``kdsweep data check``. Each must exit
non-zero with ONE stderr line (no traceback) naming the offending file and field (or option) and
how to fix it, before anything starts: the MLflow store given with ``--tracking-uri`` keeps
exactly the run it held before, unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from kdsweep import cli
from kdsweep.orchestrate.ablation import run_ablation

W, H = 64, 48


# ------------------------------------------------------------------------------------- the store
@pytest.fixture(scope="module")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    """An SQLite MLflow store holding one finished run with params, metrics and tags (built once,
    copied per case: creating the schema takes seconds), its run id and its snapshot."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("store")
    db = folder / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.create_experiment("recorded", artifact_location=(folder / "artifacts").as_uri())
    run = client.create_run(exp, run_name="earlier", tags={"kdsweep.role": "ablation"})
    run_id = run.info.run_id
    client.log_param(run_id, "preset", "smoke")
    client.log_metric(run_id, "AP", 12.5, step=1)
    client.set_terminated(run_id, "FINISHED")
    return db, run_id, _snapshot(f"sqlite:///{db}", run_id)


def _snapshot(uri: str, run_id: str) -> dict[str, Any]:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL)
    run = client.get_run(run_id)
    snap = {
        "experiments": sorted((e.experiment_id, e.name, e.lifecycle_stage) for e in experiments),
        "runs": sorted(r.info.run_id for r in runs),
        "status": run.info.status,
        "end_time": run.info.end_time,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": {k: v for k, v in run.data.tags.items()},
        "history": [(m.step, m.value) for m in client.get_metric_history(run_id, "AP")],
    }
    assert len(snap["runs"]) == 1 and snap["params"] == {"preset": "smoke"} and snap["metrics"] == {"AP": 12.5}
    return snap


# -------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    """What one bad input runs and what its single error line must contain.

    ``entry``: ``sweep`` (``kdsweep sweep SPACE --dry-run``), ``sweep-run`` (the same without
    ``--dry-run``), ``ablation`` (``run_ablation``), ``data-check`` (``kdsweep data check``: the
    problem line, then its count) or ``argparse-*`` (an argparse error: usage, then one line).
    ``expect``: substrings of the error line (the field or option and the fix); ``{dir}`` in it,
    in ``space`` and in ``argv`` stands for the case folder.
    """

    entry: str
    space: str | None = None  # search-space YAML text (written to bad.yaml)
    argv: list[str] = field(default_factory=list)  # extra options
    expect: tuple[str, ...] = ()
    file: str = "bad.yaml"  # the file the line must name (relative to the case folder)
    setup: Callable[[Path], None] | None = None


ROW_L2 = "rows:\n  - label: a\n    kd: [{loss: l2, weight: 1.0}]\n"


def _space_with(sampler: str) -> str:
    return ROW_L2 + f"space:\n  kd.0.weight: {sampler}\n"


def _row(kd: str, extra: str = "") -> str:
    return f"rows:\n  - label: a\n{extra}    kd: {kd}\n"


def _retinanet_checkpoint(folder: Path) -> None:
    """A tiny resnet18 RetinaNet state_dict, for a Faster R-CNN student."""
    from kdsweep.config import ModelConfig
    from kdsweep.models.detectors import build_detector

    model = build_detector(ModelConfig(arch="retinanet", backbone="resnet18", fpn_channels=32, min_size=128, max_size=128), 2)
    torch.save(model.state_dict(), folder / "retinanet_r18.pt")


SPACE_CASES: dict[str, Case] = {
    "unknown sampler": Case("", _space_with("{normal: [0, 1]}"),
                            expect=("space.kd.0.weight", "sampler 'normal' is unknown", "use one of grid")),
    "wrong arity (uniform with 3 numbers)": Case("", _space_with("{uniform: [0.1, 0.5, 0.9]}"),
                                                 expect=("space.kd.0.weight.uniform", "needs two numbers [low, high]")),
    "empty grid": Case("", _space_with("{grid: []}"), expect=("space.kd.0.weight.grid", "is empty", "give at least one value")),
    "bounds low >= high": Case("", _space_with("{uniform: [2.0, 1.0]}"),
                               expect=("space.kd.0.weight.uniform", "[2.0, 1.0]", "need low < high")),
    "loguniform bound <= 0": Case("", _space_with("{loguniform: [0, 1]}"),
                                  expect=("space.kd.0.weight.loguniform", "must be > 0")),
    "unknown top-level key": Case("", "rowz: []\n", expect=("key 'rowz' is unknown", "known keys: name")),
    "unknown loss name": Case("", _row("[{loss: ssimm}]"), expect=("row 'a'", "kd[0].loss 'ssimm' is unknown", "known: ")),
    "unknown model arch": Case("", _row("[]", "    student: {arch: yolo}\n"),
                               expect=("row 'a'", "student", "arch 'yolo' is unknown", "use one of")),
    "negative weight": Case("", _row("[{loss: l2, weight: -1}]"),
                            expect=("row 'a'", "kd[0]", "weight -1.0 is negative", "use a weight >= 0")),
    "impossible csa ratios (num_heads not a multiple)": Case(
        "", _row("[{loss: csa, params: {ratios: [1, 2, 4], num_heads: 8}}]"),
        expect=("row 'a'", "kd.csa.params.ratios [1, 2, 4]", "num_heads 8 must be a multiple of the number of ratios")),
    "dilation rate 0": Case("", _row("[{loss: sdf, params: {dilations: [0, 1]}}]"),
                            expect=("row 'a'", "kd.sdf.params.dilations", "[0, 1]", "e.g. [1, 2, 3]")),
    "dilation rate 100": Case("", _row("[{loss: sdf, params: {dilations: [1, 100]}}]"),
                              expect=("row 'a'", "kd.sdf.params.dilations", "[1, 100]", "e.g. [1, 2, 3]")),
    "kd level not shared (p2 with RetinaNet)": Case("", _row("[{loss: l2, levels: [p2]}]"),
                                                    expect=("row 'a'", "kd.l2.levels ['p2']", "not shared by teacher and student", "use some of")),
    "teacher/student class counts differ (mimic_logits)": Case(
        "", _row("[{loss: mimic_logits}]", "    student: {num_classes: 3}\n    teacher: {num_classes: 5}\n"),
        expect=("row 'a'", "kd.mimic_logits", "num_classes", "the same")),
    "checkpoint from another architecture": Case(
        "", "rows:\n  - label: a\n    student: {arch: fasterrcnn, weights: '{dir}/retinanet_r18.pt'}\n    kd: []\n",
        expect=("row 'a'", "student.weights", "retinanet_r18.pt", "does not match fasterrcnn resnet18", "missing",
                "unexpected", "use a checkpoint of this architecture"),
        setup=_retinanet_checkpoint),
    "teacher checkpoint of another backbone": Case(
        "", _row("[{loss: l2}]", "    student: {num_classes: 2}\n    teacher: {backbone: resnet34, num_classes: 2, "
                 "weights: '{dir}/retinanet_r18.pt'}\n"),
        expect=("row 'a'", "teacher.weights", "retinanet_r18.pt", "does not match retinanet resnet34", "missing",
                "use a checkpoint of this architecture"),
        setup=_retinanet_checkpoint),
    "checkpoint file missing": Case(
        "", "rows:\n  - label: a\n    teacher: {weights: '{dir}/nosuch.pt'}\n    kd: [{loss: l2}]\n",
        expect=("row 'a'", "teacher.weights", "nosuch.pt", "is not a file", "give a checkpoint path")),
    "not YAML": Case("", "rows: [\n  - {label: a\n", expect=("not valid YAML at line", "fix the syntax")),
    "optuna with a grid sampler": Case("", ROW_L2 + "space:\n  kd.0.weight: {grid: [1, 2]}\nsearch: {algorithm: optuna}\n",
                                       expect=("space.kd.0.weight", "optuna cannot search a grid sampler", "use choice")),
    "unknown ExperimentConfig field": Case("", "rows:\n  - label: a\n    trian: {epochs: 1}\n",
                                           expect=("row 'a'", "config.trian is unknown", "known fields: data")),
    "unknown mimicdet option": Case("", "rows:\n  - label: a\n    student: {arch: mimicdet, options: {stagered: false}}\n",
                                    expect=("row 'a'", "student.options.stagered is unknown for mimicdet", "known: ")),
    "space name with an apostrophe (--resume's MLflow filter)": Case(
        "", "name: \"it's\"\n" + ROW_L2, expect=("name \"it's\"", "may hold only letters, digits, '_', '-' and '.'", "use e.g. 'it_s'")),
    "a Python tag": Case("", "name: !!python/object:os.system {}\n" + ROW_L2,
                         expect=("the YAML tag !!python/object:os.system at line 1 is not allowed", "remove the tag")),
}


def _images(folder: Path, names: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    images = folder / "images"
    images.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((H, W, 3), 60 * i, dtype=np.uint8)).save(images / name)
    return images


def _coco(**edit: Any) -> dict[str, Any]:
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                   {"id": 2, "file_name": "b.png", "width": W, "height": H}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [20, 10, 12, 8], "area": 96, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "car"}],
    }
    for key, fn in edit.items():
        fn(data[key])
    return data


def _dataset(val: Any) -> Callable[[Path], None]:
    """A valid train.json, the given (bad) val.json, and images/."""
    def setup(folder: Path) -> None:
        _images(folder)
        (folder / "train.json").write_text(json.dumps(_coco()))
        (folder / "val.json").write_text(val if isinstance(val, str) else json.dumps(val))
    return setup


DATA_ARGS = ["--train-ann", "{dir}/train.json", "--val-ann", "{dir}/val.json", "--images", "{dir}/images"]
BASELINE = "rows:\n  - label: baseline\n    kd: []\n"
DATA_CASES: dict[str, Case] = {
    "val annotations not JSON": Case("", BASELINE, DATA_ARGS, ("not valid JSON", "fix the file"), "val.json",
                                     _dataset('{"images": [')),
    "image file missing": Case("", BASELINE, DATA_ARGS, ("image 2", "file_name 'nope.png' not found", "fix file_name"),
                               "val.json", _dataset(_coco(images=lambda imgs: imgs[1].update(file_name="nope.png")))),
    "bbox outside the image": Case("", BASELINE, DATA_ARGS, ("annotation 2", "bbox [60, 10, 12, 8]", "outside image 2", "clip it"),
                                   "val.json", _dataset(_coco(annotations=lambda anns: anns[1].update(bbox=[60, 10, 12, 8])))),
    "no images": Case("", BASELINE, DATA_ARGS, ("field 'images' is empty", "use an instances file that lists its images"),
                      "val.json", _dataset({"images": [], "annotations": [], "categories": [{"id": 1, "name": "car"}]})),
    "category ids of mixed types": Case("", BASELINE, DATA_ARGS,
                                        ("category #1", "field 'id' '2' must be an integer", "give every category an integer id"),
                                        "val.json", _dataset(_coco(categories=lambda cats: cats.append({"id": "2", "name": "bus"})))),
}

CASES: dict[str, Case] = {}
for _name, _case in SPACE_CASES.items():
    for _entry in ("sweep", "ablation"):
        CASES[f"{_entry}: {_name}"] = Case(_entry, _case.space, _case.argv, _case.expect, _case.file, _case.setup)
for _name, _case in DATA_CASES.items():
    CASES[f"ablation: {_name}"] = Case("ablation", _case.space, _case.argv, _case.expect, _case.file, _case.setup)
    CASES[f"sweep without --dry-run: {_name}"] = Case("sweep-run", _case.space, _case.argv, _case.expect, _case.file, _case.setup)
    CASES[f"data check: {_name}"] = Case("data-check", None, ["{dir}/val.json", "--images", "{dir}/images"],
                                         _case.expect, _case.file, _case.setup)
CASES.update({
    "ablation: --num-workers 0": Case("ablation", BASELINE, ["--num-workers", "0"], ("--num-workers", "must be >= 1"), ""),
    "sweep: --num-workers 0": Case("sweep", BASELINE, ["--num-workers", "0"], ("--num-workers", "must be >= 1"), ""),
    "ablation: --seeds 0": Case("ablation", BASELINE, ["--seeds", "0"], ("--seeds", "must be >= 1"), ""),
    "ablation: --max-concurrent 0": Case("ablation", BASELINE, ["--max-concurrent", "0"], ("--max-concurrent", "must be >= 1"), ""),
    "ablation: --preset nosuch": Case("argparse-ablation", BASELINE, ["--preset", "nosuch"], ("--preset", "invalid choice: 'nosuch'", "choose from"), ""),
    "sweep: --preset nosuch": Case("argparse-sweep", BASELINE, ["--preset", "nosuch"], ("--preset", "invalid choice: 'nosuch'", "choose from"), ""),
    "ablation: --rows nosuchrow": Case("ablation", BASELINE, ["--rows", "nosuchrow"], ("--rows", "'nosuchrow' is not a row", "rows: baseline"), "bad.yaml"),
    "sweep: --rows nosuchrow": Case("sweep", BASELINE, ["--rows", "nosuchrow"], ("--rows", "'nosuchrow' is not a row", "rows: baseline"), "bad.yaml"),
    "sweep: missing.yaml": Case("sweep", None, [], ("no such search-space file", "check the path"), "missing.yaml"),
    "ablation: missing.yaml": Case("ablation", None, [], ("no such search-space file", "check the path"), "missing.yaml"),
    "sweep: --num-samples 0": Case("sweep", BASELINE, ["--num-samples", "0"], ("--num-samples", "must be >= 1"), ""),
})
SMALL = ("row 'baseline'", "2 training image(s) are fewer than one step's train.batch_size 8 x train.num_workers 1 = 8",
         "lower train.batch_size or train.num_workers", "train on at least 8 images")
OUTSIDE = ("--experiment '../outside'", "must not contain '/'", "use e.g. kdsweep-mine")
for _entry in ("ablation", "sweep-run"):  # valid files, 2 training images, the smoke preset's batch of 8: no step per epoch
    CASES[f"{_entry}: fewer training images than one step"] = Case(_entry, BASELINE, DATA_ARGS, SMALL, "train.json",
                                                                  _dataset(_coco()))
    CASES[f"{_entry}: --experiment out of KDSWEEP_HOME"] = Case(_entry, BASELINE, [*DATA_ARGS, "--experiment", "../outside"],
                                                               OUTSIDE, "", _dataset(_coco()))
CASES["sweep: --experiment out of KDSWEEP_HOME"] = Case("sweep", BASELINE, ["--experiment", "../outside"], OUTSIDE, "")


def _fill(text: str, folder: Path) -> str:
    return text.replace("{dir}", str(folder))


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting Ray would mean the bad input got through: fail loudly instead of training."""
    import kdsweep.orchestrate.ablation
    import kdsweep.orchestrate.search

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Ray was started for bad input")

    for command in (kdsweep.orchestrate.ablation, kdsweep.orchestrate.search):
        monkeypatch.setattr(command, "init_ray", refuse)


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_bad_input_fails_with_one_line_and_records_nothing(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str], template_store, no_ray) -> None:
    case = CASES[name]
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "case"
    folder.mkdir()
    if case.setup is not None:
        case.setup(folder)
    space = folder / "bad.yaml"
    if case.space is not None:
        space.write_text(_fill(case.space, folder))
    elif case.entry in ("sweep", "sweep-run", "ablation"):
        space = folder / "missing.yaml"
    db = tmp_path / "mlflow.db"
    shutil.copy(template_store[0], db)
    uri = f"sqlite:///{db}"
    before_bytes = hashlib.sha256(db.read_bytes()).hexdigest()
    argv = [_fill(a, folder) for a in case.argv]
    # a valid dataset folder that does not exist: should a bad space get through, it fails on
    # the data (and this test on its expected line), never trains
    no_data = ["--data", str(folder / "no-data")] if "--train-ann" not in argv else []
    capsys.readouterr()

    entry = case.entry.removeprefix("argparse-")
    if entry in ("sweep", "sweep-run"):
        dry = ["--dry-run"] if entry == "sweep" else []
        call = lambda: cli.main(["sweep", str(space), *dry, "--preset", "smoke", "--tracking-uri", uri, *argv])  # noqa: E731
    elif entry == "ablation":
        call = lambda: run_ablation(space, ["--preset", "smoke", "--tracking-uri", uri, *no_data, *argv])  # noqa: E731
    else:
        call = lambda: cli.main(["data", "check", *argv])  # noqa: E731
    if case.entry.startswith("argparse-"):
        with pytest.raises(SystemExit) as info:
            call()
        code = info.value.code
    else:
        code = call()
    err = capsys.readouterr().err

    assert code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if case.entry.startswith("argparse-"):
        assert lines[0].startswith("usage:"), lines
        line = lines[-1]
    elif case.entry == "data-check":  # the problem lines, then the count
        assert lines[-1] == "1 problem(s) found", lines
        assert len(lines) == 2, lines
        line = lines[0]
    else:
        assert len(lines) == 1, lines
        line = lines[0]
        assert line.startswith("kdsweep: error: "), line
    if case.file:
        shown = case.file if case.entry == "data-check" else str(folder / case.file)
        assert shown in line, (shown, line)
    for part in case.expect:
        assert _fill(part, folder) in line, (part, line)

    assert hashlib.sha256(db.read_bytes()).hexdigest() == before_bytes
    assert _snapshot(uri, template_store[1]) == template_store[2]  # the one run, its data unchanged
    assert not (tmp_path / "home" / "ray_results").exists() and not (tmp_path / "home" / "mlflow").exists()


def test_the_corpus_covers_every_entry_point() -> None:
    entries = {c.entry for c in CASES.values()}
    assert {"sweep", "sweep-run", "ablation", "data-check", "argparse-sweep", "argparse-ablation"} <= entries


def test_a_checkpoint_is_checked_against_the_dataset_class_count(tmp_path: Path) -> None:
    """The control of the checkpoint cases. The preflight builds the models as the trials do, with
    the dataset's class count: ``num_classes: 0`` (the dataset's) accepts a checkpoint saved with
    that count and rejects another; a given ``num_classes`` must match the checkpoint's. When the
    count cannot be known yet (no readable annotations), every shape that does not depend on it
    is checked."""
    from kdsweep.config import ConfigError, ModelConfig
    from kdsweep.models.detectors import build_detector
    from kdsweep.orchestrate.preflight import preflight
    from kdsweep.orchestrate.space import parse_space
    from kdsweep.orchestrate.trials import row_configs, variants
    from kdsweep.presets import PRESETS

    student = {**PRESETS["smoke"].experiment["student"], "arch": "fasterrcnn"}
    path = tmp_path / "fasterrcnn_5.pt"
    torch.save(build_detector(ModelConfig(**student), 5).state_dict(), path)

    def check(classes_in_config: int, dataset_classes: int | None, kd: list) -> None:
        space = parse_space({"rows": [{"label": "a", "student": {"arch": "fasterrcnn", "weights": str(path),
                                                                "num_classes": classes_in_config}, "kd": kd}]}, "ok.yaml")
        preflight(variants(space, row_configs(space, PRESETS["smoke"].experiment)), dataset_classes, space.source)

    for kd in ([], [{"loss": "l2"}]):
        check(0, 5, kd)
        check(5, 6, kd)  # the config's own count wins
        check(0, None, kd)  # unknown yet: the class-independent shapes
        for classes_in_config, dataset in ((0, 6), (3, 5)):
            with pytest.raises(ConfigError, match=r"row 'a': student\.weights .*fasterrcnn_5\.pt: checkpoint does not match fasterrcnn"):
                check(classes_in_config, dataset, kd)

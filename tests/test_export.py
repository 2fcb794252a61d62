"""The student as a product (kdsweep.export, ``kdsweep export``, ``kdsweep.load_student``): the pt file,
TorchScript and ONNX round trips give the detections of the model itself; the MLflow model a
finished trial logs loads through ``runs:/``, ``models:/``, its run id and ``load_student``;
``--row`` takes the best seed by the parent's metric; ``--register`` describes the version; bad
input fails in one line. The slow test runs a smoke ablation and evaluates every row's student
again in a fresh process."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from kdsweep import cli
from kdsweep.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from kdsweep.export import (
    BOX_TOLERANCE,
    StudentInfo,
    build_student,
    describe_student,
    load_student,
    log_model,
    save_student,
    write_onnx,
    write_torchscript,
)
from kdsweep.models.detectors import build_detector

ROOT = Path(__file__).resolve().parents[1]
K = 2  # object classes
SIZE = 64
TINY = dict(backbone="resnet18", fpn_channels=16, min_size=SIZE, max_size=SIZE, num_classes=K)
CONFIGS = {
    "retinanet": ModelConfig(arch="retinanet", **TINY),
    "fcos": ModelConfig(arch="fcos", **TINY),
    "fasterrcnn": ModelConfig(arch="fasterrcnn", **TINY),
    "cross-scale": ModelConfig(arch="fasterrcnn", upsample=2, **TINY),  # Li et al.'s student, its deconvolution built in
    "mimicdet": ModelConfig(arch="mimicdet", options={"t_hidden": 32, "t_samples": 16, "mimic_samples": 8}, **TINY),
}


def detecting(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """A random detector of ``cfg`` (eval mode) that detects on noise: its classification and
    objectness logits rescaled to mean 0 and standard deviation 2 on a noise image (a fresh
    RetinaNet scores every box near its 0.01 prior, under the 0.05 threshold, and a fresh Faster
    R-CNN scores many boxes alike), so that a comparison of detections compares distinct boxes."""
    torch.manual_seed(seed)
    model = build_detector(cfg, K).eval()
    heads = {name: m for name, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear)) and name.rsplit(".", 1)[-1] in ("cls_logits", "objectness", "cls_score")}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in heads}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(out.flatten()))
             for name, m in heads.items()]
    with torch.no_grad():
        model(images(1, seed=99))
        for hook in hooks:
            hook.remove()
        for name, module in heads.items():
            if not seen[name]:  # a training-only head (MimicDet's T-head)
                continue
            out = torch.cat(seen[name])
            scale = 2.0 / float(out.std())
            module.weight.mul_(scale)
            module.bias.sub_(float(out.mean())).mul_(scale)  # new logits: scale * (old - their mean)
    return model


def images(count: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(count)]


def detections(model: nn.Module, batch: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        return [model([image])[0] for image in batch]


def assert_same_detections(got: list[dict], want: list[dict]) -> None:
    """Bit-equal detections, and at least one per image (an empty comparison proves nothing)."""
    for g, w in zip(got, want, strict=True):
        assert len(w["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(g[key], w[key]), key


def info_of(cfg: ModelConfig) -> StudentInfo:
    return StudentInfo(cfg, K, ({"label": 1, "id": 3, "name": "car"}, {"label": 2, "id": 8, "name": "bus"}))


# ------------------------------------------------------------------------------------ pt files
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_the_pt_file_rebuilds_the_same_module_with_the_same_detections(kind, tmp_path):
    model = detecting(CONFIGS[kind])
    path = save_student(model, info_of(CONFIGS[kind]), tmp_path / "student.pt")
    loaded = load_student(path)
    assert type(loaded) is type(model) and not loaded.training
    assert repr(loaded) == repr(model)  # the same modules: the deconvolution, MimicDet's heads
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert_same_detections(detections(loaded, images()), detections(model, images()))
    assert loaded.kdsweep.label_to_cat_id == {1: 3, 2: 8} and loaded.kdsweep.category_names == {1: "car", 2: "bus"}
    raw = torch.load(path, weights_only=True)  # plain values and tensors only
    assert raw["format"] == "kdsweep-student" and raw["version"] == 1 and raw["num_classes"] == K
    assert raw["model_config"]["arch"] == CONFIGS[kind].arch


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small"])
def test_a_student_started_from_torchvision_weights_comes_back_with_its_frozen_batchnorm(backbone, tmp_path, monkeypatch):
    """Such a student ran its backbone with FrozenBatchNorm2d (eps 1e-5, not MobileNet's 1e-3);
    load_student downloads nothing and puts those layers back."""
    from torchvision.models import mobilenet_v3_small, resnet18
    from torchvision.ops.misc import FrozenBatchNorm2d

    fresh = {"resnet18": resnet18, "mobilenet_v3_small": mobilenet_v3_small}[backbone]

    def offline(url, *args, **kwargs):  # what the weights' download would give, made here
        torch.manual_seed(3)
        state = fresh().state_dict()
        return {k: (v.uniform_(0.5, 2.0) if "running_var" in k else v) for k, v in state.items()}

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    enum = "ResNet18_Weights.IMAGENET1K_V1" if backbone == "resnet18" else "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    cfg = ModelConfig(arch="fasterrcnn", backbone=backbone, fpn_channels=16, min_size=SIZE, max_size=SIZE, num_classes=K,
                      weights=f"torchvision:{enum}", trainable_backbone_layers=3)
    model = build_detector(cfg, K).eval()
    path = save_student(model, info_of(cfg), tmp_path / "student.pt")
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda *a, **k: pytest.fail("downloaded"))
    loaded = load_student(path)
    kinds = lambda m: [type(x).__name__ for x in m.backbone.body.modules() if isinstance(x, (nn.BatchNorm2d, FrozenBatchNorm2d))]  # noqa: E731
    assert kinds(loaded) == kinds(model) and set(kinds(model)) == {FrozenBatchNorm2d.__name__}
    with torch.no_grad():
        for image in images():
            for key, value in model([image])[0].items():
                assert torch.equal(loaded([image])[0][key], value)


def test_the_parameter_count_of_the_exported_file_is_the_tables(tmp_path):
    """The table's ``params (M)``: the inference parameters of ``row_throughput``'s build of the row's
    student at its resolution (MimicDet without its training-only T-head)."""
    from kdsweep.report.throughput import count_inference_params, count_params, row_throughput

    for kind in ("retinanet", "cross-scale", "mimicdet"):
        exp = ExperimentConfig(student=CONFIGS[kind], student_scale=1.0)
        table = row_throughput({"row": exp}, K, with_teacher=False, quick=True)["row"]["params_M"]
        path = save_student(detecting(CONFIGS[kind]), describe_student(CONFIGS[kind]), tmp_path / f"{kind}.pt")
        loaded = load_student(path)
        assert count_inference_params(loaded) == round(table * 1e6)
        if kind == "mimicdet":
            assert count_params(loaded) > count_inference_params(loaded)  # the T-head is in the file, not in the count


# ------------------------------------------------------------------------------ other formats
@pytest.mark.parametrize("kind", ["retinanet", "cross-scale"])
def test_the_torchscript_file_detects_what_the_model_does(kind, tmp_path):
    model = detecting(CONFIGS[kind])
    path = write_torchscript(model, tmp_path / "student.torchscript.pt")
    scripted = torch.jit.load(str(path))
    with torch.no_grad():
        got = [scripted([image])[1][0] for image in images()]  # scripted detectors return (losses, detections)
    want = detections(model, images())
    for g, w in zip(got, want):
        assert len(w["boxes"]) > 0
        torch.testing.assert_close(g["boxes"], w["boxes"], rtol=0, atol=1e-4)
        assert torch.equal(g["labels"], w["labels"])


def onnx_matches(session, model: nn.Module, image: torch.Tensor) -> tuple[int, float, float]:
    """(detections, largest box gap in px, largest score gap) between onnxruntime and eager mode:
    each eager detection matched to the nearest ONNX box of its label and back, the scores compared
    sorted (detections of equal score may come out in another order; random box regressors clip
    many boxes to the same image corners)."""
    boxes, scores, labels = (torch.from_numpy(a) for a in session.run(None, {"image": image.numpy()}))
    with torch.no_grad():
        want = model([image])[0]
    assert len(boxes) == len(want["boxes"])
    gap = torch.cdist(want["boxes"].double(), boxes.double(), p=math.inf)
    gap[want["labels"][:, None] != labels[None, :]] = math.inf
    box_gap = max(float(gap.min(1).values.max()), float(gap.min(0).values.max()))
    return len(boxes), box_gap, float((scores.sort().values - want["scores"].sort().values).abs().max())


@pytest.mark.parametrize("kind", ["retinanet", "fcos", "fasterrcnn", "cross-scale"])
def test_onnxruntime_finds_the_boxes_of_eager_mode(kind, tmp_path):
    """Tolerance 1e-3 px and 1e-4 in score: float32 in ONNX Runtime's order of operations, not
    ATen's, moves boxes of this 64-px image by about 1e-5 px (measured); torchvision's own ONNX
    tests allow rtol 1e-3 / atol 1e-5. A wrong graph (an op exported for another shape, a lost
    deconvolution) moves boxes by pixels or changes their number."""
    ort = pytest.importorskip("onnxruntime")
    model = detecting(CONFIGS[kind])
    path = write_onnx(model, tmp_path / "student.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [[3, SIZE, SIZE]]  # one image of a fixed size
    for image in images(seed=7):
        count, box_gap, score_gap = onnx_matches(session, model, image)
        assert count > 0 and box_gap < 1e-3 and score_gap < 1e-4


def test_a_detector_the_exporters_cannot_do_fails_in_one_line(tmp_path):
    pytest.importorskip("onnxruntime")
    model = detecting(CONFIGS["mimicdet"])  # DeformConv2d: no ONNX symbolic; *args in its Pyramid: no TorchScript
    with pytest.raises(ConfigError) as onnx_error:
        write_onnx(model, tmp_path / "m.onnx")
    assert "\n" not in str(onnx_error.value) and "MimicDet" in str(onnx_error.value) and "--format pt" in str(onnx_error.value)
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ConfigError) as script_error:
        write_torchscript(model, tmp_path / "m.torchscript.pt")
    assert "\n" not in str(script_error.value) and "torch.jit.script" in str(script_error.value)


# ------------------------------------------------------------------------------------- MLflow
@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A SQLite store with an ablation parent (metric AP50 in its search space) and the tiny
    validation annotations of a dataset whose category ids are 3 and 8."""
    from kdsweep.report.tracking import Tracker

    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")
    parent = tracker.start_run("ablation", tags={"kdsweep.role": "ablation"})
    space = tmp_path / "search_space.yaml"
    space.write_text("name: x\nmetric: AP50\nmode: max\nrows: []\n")
    tracker.log_artifact(parent, space)
    val = tmp_path / "val.json"
    val.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": SIZE, "height": SIZE}], "annotations": [],
                               "categories": [{"id": 8, "name": "bus"}, {"id": 3, "name": "car"}]}))
    return SimpleNamespace(tracker=tracker, uri=tracker.uri, parent=parent, tmp=tmp_path, val=str(val))


def finish_trial(store, row: str, seed: int, model: nn.Module, cfg: ModelConfig, metrics: dict, *,
                 checkpoint: bool = True) -> str:
    """One student trial as an ablation records it: a child run through kdsweep's MLflow callback
    whose ``on_finish`` is the students' (the launcher's LogStudent), the trial's last report
    naming a checkpoint folder as a worker writes it."""
    from kdsweep.orchestrate.students import LogStudent
    from kdsweep.report.tracking import MLflowTrialCallback

    trial_id = f"t_{row}_{seed}"
    folder = store.tmp / f"train-{trial_id}" / "checkpoint_2026-12-06_10-00-00.000000"
    if checkpoint:
        folder.mkdir(parents=True)
        torch.save({"model": model.state_dict()}, folder / "model.pt")  # kdsweep.train.checkpoint's layout
    exp = ExperimentConfig(student=cfg, data=DataConfig(), train=TrainConfig())
    log = LogStudent(rows={row: exp}, samplers={}, data={"val_ann": store.val}, storage=str(store.tmp))
    describe = lambda config: (f"{config['row']} / seed {config['seed']}", {}, {  # noqa: E731
        "kdsweep.role": "student", "kdsweep.row": config["row"], "kdsweep.seed": str(config["seed"])}, {})
    callback = MLflowTrialCallback(store.uri, store.tracker.experiment_id, store.parent, describe, on_finish=log)
    trial = SimpleNamespace(trial_id=trial_id, config={"row": row, "seed": seed},
                            last_result={"epoch": 2, **metrics, "checkpoint_path": str(folder)})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, trial.last_result)
    callback.on_trial_complete(0, [], trial)
    return callback.tracker.client.search_runs([store.tracker.experiment_id],
                                               filter_string=f"tags.`kdsweep.trial_id` = '{trial_id}'")[0].info.run_id


def test_a_finished_trial_logs_its_student_which_loads_by_every_uri(store):
    import mlflow.pytorch

    from kdsweep.export import tracking

    model = detecting(CONFIGS["retinanet"])
    run_id = finish_trial(store, "baseline", 0, model, CONFIGS["retinanet"], {"AP": 12.0, "AP50": 30.0})
    run = store.tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["AP"] == 12.0
    [logged] = [m for m in store.tracker.client.search_logged_models([store.tracker.experiment_id])
                if m.source_run_id == run_id]
    assert logged.name == "student" and logged.tags["kdsweep.row"] == "baseline"
    assert logged.metrics and {m.key for m in logged.metrics} >= {"AP"}  # the run's last-epoch metrics, linked
    want = detections(model, images())
    with tracking(store.uri):
        for uri in (f"runs:/{run_id}/student", f"models:/{logged.model_id}"):
            plain = mlflow.pytorch.load_model(uri)  # MLflow's own loader: the detector itself
            assert type(plain).__name__ == "RetinaNet" and not hasattr(plain, "teacher")
            assert_same_detections(detections(plain.eval(), images()), want)
    for source in (run_id, f"runs:/{run_id}/student", f"models:/{logged.model_id}"):
        loaded = load_student(source, tracking_uri=store.uri)
        assert_same_detections(detections(loaded, images()), want)
        assert loaded.kdsweep.label_to_cat_id == {1: 3, 2: 8}  # the sorted category ids of val.json
        assert loaded.kdsweep.source["row"] == "baseline"
    assert set(loaded.state_dict()) == set(model.state_dict())  # the student alone: no teacher, no adapters


def test_a_trial_whose_last_report_had_no_checkpoint_logs_its_newest_one(store):
    old, new = detecting(CONFIGS["fcos"], seed=0), detecting(CONFIGS["fcos"], seed=1)
    trial = store.tmp / "train-t_r_0"
    for name, model in (("checkpoint_2026-12-06_09-00-00.000000", old), ("checkpoint_2026-12-06_11-00-00.000000", new)):
        (trial / name).mkdir(parents=True)
        torch.save({"model": model.state_dict()}, trial / name / "model.pt")
    from kdsweep.orchestrate.students import LogStudent

    run_id = store.tracker.start_run("r", parent=store.parent, tags={"kdsweep.role": "student", "kdsweep.row": "r"})
    log = LogStudent(rows={"r": ExperimentConfig(student=CONFIGS["fcos"])}, samplers={}, data={"val_ann": store.val},
                     storage=str(store.tmp))
    log(store.tracker, run_id, SimpleNamespace(trial_id="t_r_0", config={"row": "r", "seed": 0}, last_result={"epoch": 2}))
    store.tracker.end_run(run_id)
    assert_same_detections(detections(load_student(run_id, tracking_uri=store.uri), images()), detections(new, images()))


def test_a_student_that_cannot_be_logged_leaves_its_run_recorded_with_one_warning(store, capsys):
    run_id = finish_trial(store, "baseline", 0, detecting(CONFIGS["retinanet"]), CONFIGS["retinanet"], {"AP": 5.0},
                          checkpoint=False)
    run = store.tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["AP"] == 5.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdsweep: warning: run") and "not logged" in err[0]
    assert "kdsweep.model_not_logged" in run.data.tags
    code = cli.main(["export", run_id, "--tracking-uri", store.uri, "--out", str(store.tmp / "x.pt")])
    line = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in line and "has no logged student model" in line and "logging it failed" in line


def test_a_callback_pickled_by_an_older_kdsweep_still_ends_its_runs(store):
    """``--resume`` unpickles the callback from Tune's state: one from before ``on_finish`` existed
    has no such attribute, and its trials must still end FINISHED."""
    from kdsweep.report.tracking import MLflowTrialCallback

    describe = lambda config: ("r", {}, {"kdsweep.role": "student", "kdsweep.row": "r"}, {})  # noqa: E731
    callback = MLflowTrialCallback(store.uri, store.tracker.experiment_id, store.parent, describe)
    del callback.__dict__["on_finish"]
    trial = SimpleNamespace(trial_id="old", config={"row": "r"}, last_result={})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_complete(0, [], trial)
    [run] = [r for r in store.tracker.children(store.parent) if r.data.tags.get("kdsweep.trial_id") == "old"]
    assert run.info.status == "FINISHED"


def test_a_teacher_run_logs_its_teacher_and_stays_reusable(store):
    """As ``train_teachers`` does: ``teacher/model.pt`` (what a later launch reuses), then the model
    ``teacher_model``. Teacher reuse lists ``teacher/`` with the launcher's client: a model named
    ``teacher`` would make MLflow look it up in the global store there, and fail."""
    from kdsweep.export import MODEL_NAME

    model = detecting(CONFIGS["retinanet"])
    run_id = store.tracker.start_run("teacher", parent=store.parent,
                                     tags={"kdsweep.role": "teacher", "kdsweep.teacher_hash": "abc"})
    torch.save({"model": model.state_dict()}, store.tmp / "model.pt")
    store.tracker.log_artifact(run_id, store.tmp / "model.pt", "teacher")
    info = describe_student(CONFIGS["retinanet"], store.val, {"role": "teacher"})
    log_model(store.uri, run_id, model.state_dict(), info, MODEL_NAME["teacher"])
    store.tracker.end_run(run_id)
    assert store.tracker.find_teacher("abc").info.run_id == run_id  # a later launch still reuses it
    want = detections(model, images())
    for source in (run_id, f"runs:/{run_id}/teacher_model"):
        assert_same_detections(detections(load_student(source, tracking_uri=store.uri), images()), want)


def test_export_writes_each_format_and_register_describes_the_version(store, capsys):
    from mlflow.tracking import MlflowClient

    model = detecting(CONFIGS["fasterrcnn"])
    run_id = finish_trial(store, "ssim", 1, model, CONFIGS["fasterrcnn"], {"AP": 21.5, "AP50": 40.0})
    out = store.tmp / "ssim.pt"
    assert cli.main(["export", run_id, "--tracking-uri", store.uri, "--out", str(out), "--register", "kd-student"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "AP 21.50" in printed and "version 1" in printed
    assert_same_detections(detections(load_student(out), images()), detections(model, images()))
    assert load_student(out).kdsweep.source["run_id"] == run_id
    version = MlflowClient(store.uri).get_model_version("kd-student", "1")
    assert version.tags["kdsweep.row"] == "ssim" and version.tags["kdsweep.seed"] == "1"
    assert version.tags["kdsweep.AP"] == "21.5000" and version.tags["kdsweep.run_id"] == run_id
    assert version.description == f"ssim (seed 1): AP 21.50; run {run_id}"
    MlflowClient(store.uri).set_registered_model_alias("kd-student", "best", "1")
    for uri in ("models:/kd-student/1", "models:/kd-student@best"):
        assert_same_detections(detections(load_student(uri, tracking_uri=store.uri), images()), detections(model, images()))
    onnx_file = store.tmp / "ssim.onnx"
    assert cli.main(["export", run_id, "--tracking-uri", store.uri, "--out", str(onnx_file), "--format", "onnx",
                     "--image-size", "48", "80"]) == 0
    ort = pytest.importorskip("onnxruntime")
    assert [i.shape for i in ort.InferenceSession(str(onnx_file)).get_inputs()] == [[3, 48, 80]]
    script = store.tmp / "ssim.torchscript.pt"
    assert cli.main(["export", run_id, "--tracking-uri", store.uri, "--out", str(script), "--format", "torchscript"]) == 0
    assert torch.jit.load(str(script))([images()[0]])[1][0]["boxes"].shape[0] > 0


def test_row_takes_the_best_seed_by_the_parents_metric(store, capsys):
    cfg = CONFIGS["retinanet"]
    runs = {seed: finish_trial(store, "ssim", seed, detecting(cfg, seed=seed), cfg, {"AP": ap, "AP50": ap50})
            for seed, ap, ap50 in ((0, 30.0, 40.0), (1, 20.0, 55.0), (2, 25.0, 45.0))}  # AP50 ranks seed 1 first
    finish_trial(store, "baseline", 0, detecting(cfg), cfg, {"AP": 50.0, "AP50": 70.0})  # another row: never taken
    out = store.tmp / "best.pt"
    assert cli.main(["export", store.parent, "--row", "ssim", "--tracking-uri", store.uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"took seed 1 (run {runs[1]}), the highest AP50 of its 3 finished seed(s)" in printed
    assert load_student(out).kdsweep.source["run_id"] == runs[1]


def test_bad_input_fails_in_one_line(store, capsys, tmp_path):
    cfg = CONFIGS["retinanet"]
    finished = finish_trial(store, "ssim", 0, detecting(cfg), cfg, {"AP": 1.0})
    failed = store.tracker.start_run("l2 / seed 0", parent=store.parent, tags={"kdsweep.role": "student", "kdsweep.row": "l2"})
    store.tracker.end_run(failed, "FAILED", reason="NonFiniteLossError: loss is nan")
    other = store.tracker.start_run("someone's run")
    capsys.readouterr()
    cases = {
        (other,): "is not a student trial",
        (store.parent,): "is the parent run of an ablation",
        (failed,): "did not finish (status FAILED: NonFiniteLossError",
        ("0" * 32,): "is not in this MLflow store",
        (store.parent, "--row", "nope"): "--row 'nope' is not a row of run",
        (finished, "--row", "ssim"): "is a trial, not the parent run",
    }
    for argv, fragment in cases.items():
        code = cli.main(["export", *argv, "--tracking-uri", store.uri, "--out", str(tmp_path / "x.pt")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and err.startswith("kdsweep: error:") and fragment in err, (argv, err)
    assert not (tmp_path / "x.pt").exists()
    (tmp_path / "weights.pt").write_bytes(b"")
    torch.save({"model": detecting(cfg).state_dict()}, tmp_path / "checkpoint.pt")  # a checkpoint, not an export
    save_student(detecting(cfg), info_of(cfg), tmp_path / "v1.pt")
    future = torch.load(tmp_path / "v1.pt", weights_only=True)
    torch.save({**future, "version": 2}, tmp_path / "v2.pt")
    (tmp_path / "notes.txt").write_text("hello")
    files = {"weights.pt": "is not a kdsweep student file", "checkpoint.pt": "is not a kdsweep student (no 'kdsweep-student'",
             "v2.pt": "format version 2", "notes.txt": "is not a kdsweep student file", "missing.pt": "is neither a file"}
    for name, fragment in files.items():
        with pytest.raises(ConfigError) as error:
            load_student(tmp_path / name)
        assert "\n" not in str(error.value) and fragment in str(error.value), (name, str(error.value))
    wrong = dataclasses.replace(cfg, fpn_channels=32)  # weights of another model under this config
    torch.save({**StudentInfo(wrong, K).to_dict(), "state_dict": detecting(cfg).state_dict()}, tmp_path / "mixed.pt")
    with pytest.raises(ConfigError, match="checkpoint does not match retinanet resnet18"):
        load_student(tmp_path / "mixed.pt")


def test_mimicdet_students_export_as_pt_and_the_other_formats_say_why_not(store, capsys):
    pytest.importorskip("onnxruntime")
    cfg = CONFIGS["mimicdet"]
    model = detecting(cfg)
    run_id = finish_trial(store, "mimic", 0, model, cfg, {"AP": 3.0})
    assert cli.main(["export", run_id, "--tracking-uri", store.uri, "--out", str(store.tmp / "m.pt")]) == 0
    assert_same_detections(detections(load_student(store.tmp / "m.pt"), images()), detections(model, images()))
    capsys.readouterr()
    for fmt in ("onnx", "torchscript"):
        code = cli.main(["export", run_id, "--tracking-uri", store.uri, "--out", str(store.tmp / f"m.{fmt}"), "--format", fmt])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and "MimicDet" in err and "--format pt" in err


def test_kdsweep_import_stays_light_and_the_tags_are_trackings():
    from kdsweep import export
    from kdsweep.report import tracking

    assert (export.TAG_ROLE, export.TAG_ROW, export.TAG_SEED, export.PARENT_TAG, export.TAG_NOT_LOGGED) == (
        tracking.TAG_ROLE, tracking.TAG_ROW, tracking.TAG_SEED, tracking.PARENT_TAG, tracking.TAG_NOT_LOGGED)
    probe = ("import sys, kdsweep; assert callable(kdsweep.load_student); "
             "print(sorted(m for m in ('torch', 'mlflow', 'ray', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


def test_build_student_downloads_nothing_and_ignores_a_missing_checkpoint_path(tmp_path):
    cfg = dataclasses.replace(CONFIGS["retinanet"], weights=str(tmp_path / "gone.pt"))  # trained from a file since deleted
    model = build_student(StudentInfo(cfg, K))
    assert type(model).__name__ == "RetinaNet" and not model.training


# --------------------------------------------------------------------------------- end to end
EVALUATE = r"""
import json, sys
import kdsweep
from kdsweep.export import evaluate_student
uri, runs = sys.argv[1], json.loads(sys.argv[2])
print(json.dumps({run_id: evaluate_student(kdsweep.load_student(run_id, tracking_uri=uri), config)["AP"]
                  for run_id, config in runs.items()}))
"""


@pytest.mark.slow
def test_every_row_of_a_smoke_ablation_exports_a_student_that_scores_its_runs_ap(tmp_path):
    """A smoke ablation (a baseline and a distilled row, so a teacher too); then, in a fresh
    process, each row's student from ``kdsweep.load_student(run id)`` evaluated on the validation
    set scores the AP its run logged (the same weights, the same images: within 0.05)."""
    import os

    from mlflow.tracking import MlflowClient

    space = tmp_path / "export.yaml"
    space.write_text(yaml.safe_dump({"name": "export", "rows": [
        {"label": "baseline", "kd": []}, {"label": "l2", "kd": [{"loss": "l2", "adapter": True}]}],
        # the smoke preset's students score AP 0.0, which any model matches: on simple data with
        # GroupNorm heads they reach about 1-2 AP in 2 epochs, a different value each epoch
        "presets": {"smoke": {"experiment": {"data": {"synth_style": "simple", "synth_train": 160, "synth_val": 24},
                                             "student": {"head_norm": True}, "train": {"epochs": 2, "lr": 0.004}}}}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, KDSWEEP_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, str(ROOT / "launch" / "ablation_ssim.py"), "--space", str(space), "--preset", "smoke",
           "--tracking-uri", uri, "--experiment", "export", "--max-concurrent", "1", "--no-throughput"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "not logged" not in proc.stderr, proc.stderr[-2000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("export")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    students = {r.info.run_id: r for r in runs if r.data.tags.get("kdsweep.role") == "student"}
    assert sorted(r.data.tags["kdsweep.row"] for r in students.values()) == ["baseline", "l2"]
    configs = {}
    for run_id in students:
        with open(client.download_artifacts(run_id, "config.json", str(tmp_path))) as f:
            configs[run_id] = json.load(f)
    teachers = [r for r in runs if r.data.tags.get("kdsweep.role") == "teacher"]
    assert len(teachers) == 1
    kept = [p for p in (tmp_path / "home" / "teachers").rglob("*") if p.is_file()]
    assert [p.name for p in kept] == ["model.pt"]  # the teacher's weights alone, not its optimizer state
    out = subprocess.run([sys.executable, "-c", EVALUATE, uri, json.dumps(configs)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    scored = json.loads(out.stdout.strip().splitlines()[-1])
    for run_id, run in students.items():
        assert run.data.metrics["AP"] > 0.2  # a number that a wrong model would not hit
        assert abs(scored[run_id] - run.data.metrics["AP"]) <= 0.05, (run.data.tags["kdsweep.row"], scored[run_id],
                                                                      run.data.metrics["AP"])
    teacher = load_student(teachers[0].info.run_id, tracking_uri=uri)  # the teacher run logged its teacher too
    assert type(teacher).__name__ == "RetinaNet"
    parent = next(r for r in runs if r.data.tags.get("kdsweep.role") == "ablation")
    target = tmp_path / "l2.pt"
    assert cli.main(["export", parent.info.run_id, "--row", "l2", "--tracking-uri", uri, "--out", str(target)]) == 0
    assert load_student(target).kdsweep.source["row"] == "l2"


def test_a_trial_that_finished_before_models_were_logged_exports_from_its_last_checkpoint(store, capsys, tmp_path):
    """Nothing a user computed is lost: a trial of an earlier kdsweep (no ``student`` model in its
    run) exports from the ``model.pt`` of its Train run's last checkpoint, rebuilt from the run's
    own ``config.json``; without that storage, or with --register, one line says why not."""
    cfg = CONFIGS["retinanet"]
    model = detecting(cfg)
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    exp = ExperimentConfig(student=cfg, data=DataConfig(train_ann=store.val, val_ann=store.val, images=str(images_dir)),
                           train=TrainConfig())
    run_id = store.tracker.start_run("ssim / seed 1", parent=store.parent, tags={
        "kdsweep.role": "student", "kdsweep.row": "ssim", "kdsweep.seed": "1", "kdsweep.trial_id": "old_00001"})
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(exp)))
    store.tracker.log_artifact(run_id, tmp_path / "config.json")
    store.tracker.end_run(run_id)
    storage = tmp_path / "ray_results"
    for name, state in (("checkpoint_2026-11-21_09-00-00.000000", detecting(cfg, seed=5).state_dict()),
                        ("checkpoint_2026-11-21_10-00-00.000000", model.state_dict())):
        (storage / "train-old_00001" / name).mkdir(parents=True)
        torch.save({"model": state}, storage / "train-old_00001" / name / "model.pt")
    out = tmp_path / "old.pt"
    capsys.readouterr()
    assert cli.main(["export", run_id, "--tracking-uri", store.uri, "--storage-path", str(storage), "--out", str(out)]) == 0
    assert "(checkpoint)" in capsys.readouterr().out
    loaded = load_student(out)
    assert_same_detections(detections(loaded, images()), detections(model, images()))  # the newest checkpoint's
    assert loaded.kdsweep.label_to_cat_id == {1: 3, 2: 8} and loaded.kdsweep.source["row"] == "ssim"
    for argv, fragment in (([], "no checkpoint under"), (["--storage-path", str(storage), "--register", "m"],
                                                          "logged no MLflow model to register")):
        assert cli.main(["export", run_id, "--tracking-uri", store.uri, "--out", str(tmp_path / "x.pt"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and fragment in err, err

"""The distilled student as a product: logged to MLflow, written to a file, loaded back.

Every finished student trial logs its final student to its child MLflow run as a PyTorch-flavour
model named ``student`` (a teacher run: ``teacher``), through :func:`log_model`: the detector
alone (no teacher, adapters or optimizer state), pickled (``serialization_format="pickle"``:
torchvision detectors do not go through ``torch.export``), with a ``kdsweep`` metadata section in
its ``MLmodel`` (:class:`StudentInfo`: the detector's ``ModelConfig``, its class count, the
categories). ``kdsweep export`` (:func:`run_export`) writes that model as a file:

* ``pt``: ``torch.save`` of ``{"format": "kdsweep-student", "version": 1, **StudentInfo, "state_dict"}``,
  read back with ``torch.load(weights_only=True)``: tensors and plain values only;
* ``torchscript``: ``torch.jit.script`` of the detector in eval mode;
* ``onnx``: torchvision's ONNX path (``torch.onnx.export(..., dynamo=False)``, one image of a
  fixed size), checked with onnxruntime.

:func:`load_student` gives the detector back, in eval mode, rebuilt from the stored config (no
YAML, no kdsweep config, nothing downloaded): from a ``pt`` file, a ``runs:/`` or ``models:/``
URI, or a run id. MLflow is imported only when a URI or run id needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdsweep.config import ConfigError, ModelConfig, from_dict, to_dict
from kdsweep.models.detectors import TORCHVISION_PREFIX, build_detector, describe, load_state

__all__ = ["FORMAT", "FORMATS", "VERSION", "StudentInfo", "build_student", "describe_student", "load_student",
           "log_model", "read_student", "run_export", "save_student", "write_onnx", "write_torchscript"]

FORMAT = "kdsweep-student"
VERSION = 1
FORMATS = {"pt": ".pt", "torchscript": ".torchscript.pt", "onnx": ".onnx"}
ONNX_OPSET = 17

# The tags of :mod:`kdsweep.report.tracking`, spelled out: importing it brings Ray
# (tests/test_export.py checks that they are the same).
TAG_ROLE, TAG_ROW, TAG_SEED = "kdsweep.role", "kdsweep.row", "kdsweep.seed"
PARENT_TAG = "mlflow.parentRunId"
TAG_NOT_LOGGED = "kdsweep.model_not_logged"
"""On a run whose model could not be logged: the one-line reason."""
MODEL_NAME = {"student": "student", "teacher": "teacher_model"}
"""The name of the logged model of a run, by its ``kdsweep.role``. Not ``teacher``: a teacher run
keeps its weights file under ``teacher/``, and MLflow 3.17's ``MlflowClient.list_artifacts(run,
"teacher")`` (teacher reuse lists it) then looks the model up through the *global* tracking URI
and fails on any other store."""
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


# ------------------------------------------------------------------------------ what is stored
@dataclass(frozen=True)
class StudentInfo:
    """What is stored with a student's weights, enough to rebuild it with no other file.

    ``model``: the detector's ``ModelConfig`` as it was built (at its resolution: ``student_scale``
    applied); ``num_classes``: object classes without background (labels ``1..K``);
    ``categories``: ``{"label", "id", "name"}`` per class (the dataset's category ids and names,
    label ``i`` is category ``id``), empty when unknown; ``source``: where it came from (run id,
    role, row, seed, the metrics of that run), informational.
    """

    model: ModelConfig
    num_classes: int
    categories: tuple[Mapping[str, Any], ...] = ()
    source: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label_to_cat_id(self) -> dict[int, int]:
        """Model label -> dataset category id."""
        return {int(c["label"]): int(c["id"]) for c in self.categories}

    @property
    def category_names(self) -> dict[int, str]:
        """Model label -> category name."""
        return {int(c["label"]): str(c["name"]) for c in self.categories}

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (``torch.load(weights_only=True)`` and MLflow's YAML both read them)."""
        return {"format": FORMAT, "version": VERSION, "model_config": to_dict(self.model),
                "num_classes": int(self.num_classes), "categories": [dict(c) for c in self.categories],
                "source": dict(self.source)}

    @classmethod
    def from_dict(cls, data: Any, origin: str) -> "StudentInfo":
        """Raises: ConfigError: one line naming ``origin``: not a kdsweep student, another version."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ConfigError(f"{origin} is not a kdsweep student (no '{FORMAT}' format mark); give a file written "
                              "by `kdsweep export`, a runs:/ or models:/ URI of a kdsweep run's model, or a run id")
        if data.get("version") != VERSION:
            raise ConfigError(f"{origin} is a kdsweep student of format version {data.get('version')}; this kdsweep "
                              f"reads version {VERSION}: export it again with this version")
        try:
            model = from_dict(ModelConfig, data["model_config"], "model_config")
            classes = int(data["num_classes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: its stored model config is unreadable ({exc}); export it again") from None
        return cls(model, classes, tuple(dict(c) for c in data.get("categories") or ()), dict(data.get("source") or {}))


def describe_student(model: ModelConfig, val_ann: str | Path | None = None, source: Mapping[str, Any] | None = None
                     ) -> StudentInfo:
    """The :class:`StudentInfo` of a detector built from ``model`` on the data whose validation
    annotations are ``val_ann`` (the class count and categories the trials use: the sorted
    category ids of the file, labels ``1..K``); ``model.num_classes`` wins when set."""
    categories: tuple[dict[str, Any], ...] = ()
    if val_ann is not None:
        from kdsweep.data.annotations import load_compact

        ann = load_compact(val_ann)
        categories = tuple({"label": i + 1, "id": int(c), "name": str(n)}
                           for i, (c, n) in enumerate(zip(ann.category_ids, ann.category_names)))
    classes = model.num_classes or len(categories)
    if classes < 1:
        raise ConfigError("the student's class count is unknown: give model.num_classes or the validation annotations")
    return StudentInfo(model, classes, categories, dict(source or {}))


def build_student(info: StudentInfo) -> nn.Module:
    """The detector of ``info``, untrained, with the modules the trained one had, in eval mode.

    Nothing is downloaded or read: ``weights`` is not used (a local checkpoint it names may be
    gone; ``torchvision:`` weights would download). A detector that started from torchvision
    weights ran its backbone with ``FrozenBatchNorm2d`` (``models.detectors``): those layers are
    put back (with its eps, 1e-5, which is not MobileNet's BatchNorm eps), so that the trained
    statistics compute what they computed in training.
    """
    cfg = dataclasses.replace(info.model, weights=None)
    model = build_detector(cfg, info.num_classes)
    if (info.model.weights or "").startswith(TORCHVISION_PREFIX):
        _freeze_norms(model.backbone.body)
    return model.eval()


def _freeze_norms(module: nn.Module) -> None:
    """Replace every ``BatchNorm2d`` under ``module`` by torchvision's ``FrozenBatchNorm2d``."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features))
        else:
            _freeze_norms(child)


def _assemble(info: StudentInfo, state: Mapping[str, Tensor], origin: str) -> nn.Module:
    model = build_student(info)
    load_state(model, state, origin, describe(info.model))
    return model.eval()


# ------------------------------------------------------------------------------------ pt files
def save_student(model: nn.Module, info: StudentInfo, path: str | Path) -> Path:
    """Write the ``pt`` file of ``model`` (its state_dict on the CPU) and ``info``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    torch.save({**info.to_dict(), "state_dict": state}, path)
    return path


def _read_file(path: Path) -> tuple[StudentInfo, dict[str, Tensor]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ConfigError(f"{path} could not be read ({exc.strerror or exc}); give a file written by `kdsweep export`") from None
    except Exception as exc:  # noqa: BLE001 - another format (ONNX, TorchScript, a pickle): one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(f"{path} is not a kdsweep student file ({reason}); give a .pt file written by "
                          "`kdsweep export` (load TorchScript with torch.jit.load, ONNX with onnxruntime)") from None
    info = StudentInfo.from_dict(obj, str(path))
    state = obj.get("state_dict")
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path} has no state_dict of tensors; export it again")
    return info, dict(state)


# ------------------------------------------------------------------------------------- MLflow
def default_tracking_uri() -> str:
    """MLflow's tracking URI if set (``mlflow.set_tracking_uri``, ``MLFLOW_TRACKING_URI``), else the
    embedded store under ``KDSWEEP_HOME``."""
    from mlflow.tracking._tracking_service.utils import get_tracking_uri, is_tracking_uri_set

    from kdsweep import paths

    return get_tracking_uri() if is_tracking_uri_set() else paths.mlflow_uri()


@contextlib.contextmanager
def tracking(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the block, then put back as it was (the
    ``MLFLOW_TRACKING_URI`` variable included: ``mlflow.set_tracking_uri`` writes it). The
    fluent ``log_model`` / ``register_model`` / ``load_model`` read only the global URI."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """No download progress bars and no warning that a pickled model must come from a trusted
    source (each trial would print it; kdsweep logs only models it built itself)."""
    import logging

    logger = logging.getLogger("mlflow.pytorch")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def _requirements() -> list[str]:
    """torch and torchvision pinned to the running versions (the local ``+cu130`` label left out):
    given, so that MLflow does not infer them by loading the model in a subprocess."""
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]


def log_model(uri: str, run_id: str, state: Mapping[str, Tensor], info: StudentInfo, name: str = "student",
              step: int = 0) -> str:
    """Log the detector of ``info`` with weights ``state`` to run ``run_id`` of the store ``uri``
    as an MLflow PyTorch model called ``name``; returns its ``models:/<model id>`` URI.

    The model is a LoggedModel of the run's experiment (MLflow 3: its files go under the
    experiment's artifact root, ``.../models/<model id>/artifacts``, the store the run's
    artifacts go to, ``s3://`` included), linked to the run (``runs:/<run id>/<name>`` finds it)
    and to the run's metrics at ``step`` (the last epoch). No input example: see docs/export.md.

    Raises:
        ConfigError: ``state`` does not fit the detector of ``info``; anything MLflow raises.
    """
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    model = _assemble(info, state, f"run {run_id}'s weights")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    tags = {f"kdsweep.{key}": str(info.source[key]) for key in ("role", "row", "seed") if info.source.get(key) is not None}
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, tags=tags,
                                        model_type="detector")
    try:
        with tracking(uri), _quiet_mlflow():
            mlflow.pytorch.log_model(model, name=name, run_id=run_id, model_id=logged.model_id, step=step,
                                     serialization_format="pickle", pip_requirements=_requirements(),
                                     metadata={"kdsweep": info.to_dict()})
    except BaseException:
        with contextlib.suppress(Exception):  # not left PENDING: `kdsweep export` takes READY models only
            client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    return f"models:/{logged.model_id}"


def _run_model_uri(client: Any, run_id: str, allow_checkpoint: bool = False) -> tuple[str | None, Any]:
    """``(models:/<id>, run)`` of the model a run logged; with ``allow_checkpoint``, ``(None, run)``
    for a student trial that logged none (it finished before kdsweep logged models).

    Raises:
        ConfigError: not in the store, a parent run, not a trial, not finished, no model logged.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"run '{run_id}' is not in this MLflow store; pass a run id from `kdsweep ui` "
                          "(and --tracking-uri for another store)") from None
    tags = run.data.tags
    role = tags.get(TAG_ROLE)
    what = f"run {run_id} ({run.info.run_name})"
    if role not in MODEL_NAME:
        if role in ("ablation", "sweep"):
            raise ConfigError(f"{what} is the parent run of an {role}; pass one of its trials, or the parent with "
                              "--row LABEL to take that row's best seed")
        raise ConfigError(f"{what} is not a student trial of kdsweep (no {TAG_ROLE} tag of a trial); pass the run id "
                          "of a trial (a child run of an ablation)")
    if run.info.status != "FINISHED":
        reason = tags.get("kdsweep.failure_reason")
        raise ConfigError(f"{what} did not finish (status {run.info.status}{': ' + reason[:120] if reason else ''}); "
                          "export a FINISHED trial")
    name = MODEL_NAME[role]
    found = [m for m in client.search_logged_models([run.info.experiment_id],
                                                    filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
             if str(m.status) == "READY"]  # not one whose logging failed
    if not found:
        if allow_checkpoint and role == "student":
            return None, run  # the caller reads the trial's last checkpoint (_from_checkpoint)
        why = tags.get(TAG_NOT_LOGGED)
        raise ConfigError(f"{what} has no logged {name} model ("
                          + (f"logging it failed: {why[:160]}" if why else "it finished before kdsweep logged models")
                          + "); export another trial, or rerun this one")
    return f"models:/{max(found, key=lambda m: m.creation_timestamp).model_id}", run  # the newest: a resumed trial's


def _from_checkpoint(client: Any, run: Any, storage: str | None) -> tuple[StudentInfo, dict[str, Tensor], str]:
    """``(info, state_dict, where)`` of a student trial that finished before kdsweep logged models:
    the ``model.pt`` of the last checkpoint of its Train run (``train-<trial id>`` under the Ray
    storage path: ``storage``, default ``KDSWEEP_HOME/ray_results``), rebuilt from the run's own
    ``config.json`` on the data it names (for the class count and the category names).

    Raises:
        ConfigError: no trial id, no checkpoint there, no config, data not found (one line each).
    """
    import json

    from kdsweep import paths
    from kdsweep.config import ExperimentConfig, student_model
    from kdsweep.data.coco import DataError, resolve_data
    from kdsweep.orchestrate.runner import latest_checkpoint, train_run_name
    from kdsweep.orchestrate.teacher import checkpoint_weights

    run_id, tags = run.info.run_id, run.data.tags
    what = f"run {run_id} ({run.info.run_name})"
    trial = tags.get("kdsweep.trial_id")
    storage = storage or str(paths.ray_storage())
    run_name = train_run_name(str(trial))
    checkpoint = latest_checkpoint(storage, run_name) if trial else None
    if checkpoint is None:
        why = tags.get(TAG_NOT_LOGGED)
        raise ConfigError(f"{what} has no logged student model ("
                          + (f"logging it failed: {why[:160]}" if why else "it finished before kdsweep logged models")
                          + f") and no checkpoint under {storage}/{run_name}; pass --storage-path where its launch "
                          "kept its Ray results")
    state = checkpoint_weights(checkpoint)
    with tempfile.TemporaryDirectory(prefix="kdsweep-student-") as tmp, _quiet_mlflow():
        try:
            config = json.loads(Path(client.download_artifacts(run_id, "config.json", tmp)).read_text())
        except Exception as exc:  # noqa: BLE001 - MlflowException, OSError, a bad JSON: one line
            raise ConfigError(f"{what}: its config.json could not be read ({_first_line(exc)}); export a trial "
                              "that logged its model") from None
    exp = from_dict(ExperimentConfig, config, f"{what} config.json")
    try:
        val_ann = resolve_data(exp.data).val_ann
    except DataError as exc:
        raise ConfigError(f"{what}: the data it trained on is not found ({exc}); it names the classes") from None
    source = {"role": "student", "row": tags.get(TAG_ROW), "seed": tags.get(TAG_SEED), "run_id": run_id}
    return describe_student(student_model(exp), val_ann, source), state, f"{checkpoint.path} (checkpoint)"


def _read_mlflow(uri: str, tracking_uri: str) -> tuple[StudentInfo, dict[str, Tensor]]:
    """``(info, state_dict)`` of an MLflow model that kdsweep logged (``runs:/``, ``models:/``)."""
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    with tracking(tracking_uri), _quiet_mlflow(), tempfile.TemporaryDirectory(prefix="kdsweep-student-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            meta = (Model.load(local).metadata or {}).get("kdsweep")
        except MlflowException as exc:
            reason = (str(exc).strip().splitlines() or ["not found"])[0][:160]
            raise ConfigError(f"{uri}: no MLflow model there ({reason}); pass runs:/<run id>/student, "
                              "models:/<model id> or a run id (and --tracking-uri for another store)") from None
        info = StudentInfo.from_dict(meta, uri)
        module = mlflow.pytorch.load_model(local, map_location="cpu")
    return info, module.state_dict()


def read_student(path_or_uri: str | os.PathLike, *, tracking_uri: str | None = None
                 ) -> tuple[StudentInfo, dict[str, Tensor]]:
    """``(info, state_dict)`` of a student: a ``pt`` file, a local MLflow model folder, a
    ``runs:/`` or ``models:/`` URI, or a run id (see :func:`load_student`).

    Raises:
        ConfigError: one line naming the input and the fix.
    """
    text = os.fspath(path_or_uri)
    if text.startswith(("runs:/", "models:/")):
        return _read_mlflow(text, tracking_uri or default_tracking_uri())
    path = Path(text).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir() and (path / "MLmodel").is_file():
        return _read_mlflow(str(path.resolve()), tracking_uri or default_tracking_uri())
    if RUN_ID.match(text):
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or default_tracking_uri()
        client = MlflowClient(tracking_uri=uri)
        model_uri, run = _run_model_uri(client, text, allow_checkpoint=True)
        if model_uri is None:
            info, state, _ = _from_checkpoint(client, run, None)
            return info, state
        return _read_mlflow(model_uri, uri)
    raise ConfigError(f"'{text}' is neither a file, a runs:/ or models:/ URI nor an MLflow run id; give a file written "
                      "by `kdsweep export`, runs:/<run id>/student, models:/<model id> or a run id")


def load_student(path_or_uri: str | os.PathLike, *, tracking_uri: str | None = None,
                 device: str | torch.device = "cpu") -> nn.Module:
    """The distilled detector, in eval mode on ``device``, rebuilt from the config stored with its
    weights (no YAML, no kdsweep config, nothing downloaded).

    Args:
        path_or_uri: a file written by ``kdsweep export`` (format ``pt``), a ``runs:/<run id>/student``
            (``.../teacher`` for a teacher run) or ``models:/<model id>`` URI (also
            ``models:/<name>/<version>`` of the registry), a local MLflow model folder, or the id
            of a finished trial's run.
        tracking_uri: the MLflow store of a URI or run id (default: MLflow's tracking URI if set,
            else the embedded store under ``KDSWEEP_HOME``).
    Returns:
        A torchvision ``RetinaNet`` / ``FCOS`` / ``FasterRCNN`` (or kdsweep's ``MimicDet``):
        ``model(images: list[(3, H, W) float in [0, 1]])`` returns
        ``[{"boxes": (d, 4) xyxy, "scores": (d,), "labels": (d,) in 1..K}]``; its
        :class:`StudentInfo` is ``model.kdsweep`` (``label_to_cat_id``, ``category_names``).
    Raises:
        ConfigError: one line naming the input: not found, not a student, weights that do not fit.
    """
    info, state = read_student(path_or_uri, tracking_uri=tracking_uri)
    model = _assemble(info, state, os.fspath(path_or_uri)).to(device)
    model.kdsweep = info
    return model


def evaluate_student(model: nn.Module, config: Mapping[str, Any]) -> dict[str, float]:
    """COCO statistics of ``model`` (a loaded student) on the validation set of the trial config
    ``config`` (a run's ``config.json``: the same images, resolution pipeline and evaluator as the
    trial's own evaluation), on the CPU: ``{AP, AP50, ..., eval_images}``."""
    from kdsweep.config import ExperimentConfig
    from kdsweep.data.coco import resolve_data
    from kdsweep.data.loader import build_loaders
    from kdsweep.train.engine import evaluate

    exp = from_dict(ExperimentConfig, config, "config")
    loaders = build_loaders(resolve_data(exp.data).strings(), exp, exp.train, 0, 1, "cpu")
    val = loaders.val_set
    return evaluate(model, loaders.val, device=torch.device("cpu"), coco_gt=val.coco_gt,
                    label_to_cat_id=val.label_to_cat_id, image_ids=val.image_ids, evaluator=exp.train.evaluator)


# ---------------------------------------------------------------------------- other formats
def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _check_images(size: tuple[int, int], count: int = 2) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, *size, generator=g) for _ in range(count)]


def _max_box_gap(ref: Mapping[str, Tensor], boxes: Tensor, labels: Tensor) -> float:
    """Largest distance (max-norm, pixels) from a detection of ``ref`` to the nearest box of the
    same label in ``boxes`` and back; inf when the counts differ. Order-free: detections of equal
    score may come out in another order."""
    if len(ref["boxes"]) != len(boxes):
        return math.inf
    if len(boxes) == 0:
        return 0.0
    gap = torch.cdist(ref["boxes"].double(), boxes.double(), p=math.inf)
    gap[ref["labels"][:, None] != labels[None, :]] = math.inf
    return float(max(gap.min(1).values.max(), gap.min(0).values.max()))


BOX_TOLERANCE = 0.01
"""Pixels: the exported model's boxes against eager mode's (float32 in another order of operations
differs by about 1e-5 px on a 64-px image; a hundredth of a pixel changes no IoU that matters)."""


def write_torchscript(model: nn.Module, path: str | Path) -> Path:
    """``torch.jit.script`` the detector (eval mode), save it, load it back and check its
    detections against eager mode on two random images. The scripted torchvision detector returns
    ``(losses, detections)`` (torchvision's scripting convention).

    Raises:
        ConfigError: the detector cannot be scripted, or the loaded file computes something else.
    """
    model = model.eval()
    try:
        scripted = torch.jit.script(model)
    except Exception as exc:  # noqa: BLE001 - TorchScript's frontend errors are many kinds
        raise ConfigError(f"--format torchscript: torch.jit.script cannot compile this {type(model).__name__} "
                          f"({_first_line(exc)}); use --format pt (kdsweep.load_student)") from None
    path = Path(path)
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path), map_location="cpu")
    size = _model_size(model)
    with torch.no_grad():
        for image in _check_images(size):
            ref = model([image])[0]
            got = loaded([image])[1][0]
            if _max_box_gap(ref, got["boxes"], got["labels"]) > BOX_TOLERANCE:
                raise ConfigError(f"--format torchscript: the scripted {type(model).__name__} detects other boxes than "
                                  "the model itself; use --format pt")
    return path


def _model_size(model: nn.Module) -> tuple[int, int]:
    side = getattr(getattr(model, "transform", None), "min_size", (64,))
    side = side[0] if isinstance(side, (tuple, list)) else side
    return int(side), int(side)


class _OneImage(nn.Module):
    """``image (3, H, W) -> (boxes, scores, labels)`` of a detector: the ONNX graph's interface,
    in this order whatever the detector's dict order (Faster R-CNN's is boxes, labels, scores)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.detector([image])[0]
        return out["boxes"], out["scores"], out["labels"]


def write_onnx(model: nn.Module, path: str | Path, size: tuple[int, int] | None = None) -> Path:
    """torchvision's ONNX export of the detector (eval mode; the TorchScript-based exporter,
    ``dynamo=False``, opset :data:`ONNX_OPSET`, with torchvision's symbolics for NMS and RoIAlign):
    one input ``image`` of the fixed shape ``(3, H, W)`` (``size``; default the model's
    ``min_size`` square), outputs ``boxes`` (d, 4), ``scores`` (d,), ``labels`` (d,).

    Then onnxruntime loads the file and runs it on two random images (the second one is not the
    image the graph was traced with: a detection count frozen into the graph shows there). Boxes
    that differ from eager mode's by more than :data:`BOX_TOLERANCE` get a one-line warning, not
    an error: detections of equal score (common in a barely trained model) may be kept or
    dropped in another order by the two NMS implementations.

    Raises:
        ConfigError: the exporter or onnxruntime cannot do this detector (one line).
    """
    model = model.eval()
    size = size or _model_size(model)
    path = Path(path)
    try:
        import onnx  # noqa: F401 - the exporter writes the file with it
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f"--format onnx needs the packages onnx and onnxruntime ({exc}); pip install onnx onnxruntime "
                          "(or the test extras: pip install -e '.[test]')") from None
    name = type(model).__name__
    images = _check_images(size)
    try:
        with warnings_quiet():
            torch.onnx.export(_OneImage(model).eval(), (images[0],), str(path), opset_version=ONNX_OPSET, dynamo=False,
                              input_names=["image"], output_names=["boxes", "scores", "labels"],
                              do_constant_folding=True)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = [session.run(None, {"image": image.numpy()}) for image in images]
    except Exception as exc:  # noqa: BLE001 - exporter and runtime errors are many kinds
        path.unlink(missing_ok=True)
        raise ConfigError(f"--format onnx: torchvision's ONNX export cannot do this {name} with onnxruntime "
                          f"({_first_line(exc)}); use --format pt (kdsweep.load_student)") from None
    gaps = []
    with torch.no_grad():
        for image, (boxes, _, labels) in zip(images, outputs):
            gaps.append(_max_box_gap(model([image])[0], torch.from_numpy(boxes), torch.from_numpy(labels)))
    if max(gaps) > BOX_TOLERANCE:
        print(f"kdsweep: warning: onnxruntime's detections on a random {size[0]}x{size[1]} image differ from the "
              f"{name}'s own (largest box gap {max(gaps):.3g} px; equal scores may be resolved in another order): "
              "compare them on your images", file=sys.stderr, flush=True)
    return path


@contextlib.contextmanager
def warnings_quiet() -> Iterator[None]:
    """The legacy exporter's deprecation and tracer warnings, which say nothing to a user, hidden."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -------------------------------------------------------------------------------- the command
def _search_metric(client: Any, parent: Any) -> tuple[str, str]:
    """``(metric, mode)`` of a parent run's search space (its ``search_space.yaml``), default AP / max."""
    import yaml

    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "search_space.yaml", tmp)).read_text())
        return str(data.get("metric", "AP")), str(data.get("mode", "max"))
    except Exception:  # noqa: BLE001 - an older parent without the file: the ablations' default
        return "AP", "max"


def best_seed(client: Any, parent: Any, row: str) -> tuple[Any, str]:
    """The FINISHED trial of ``row`` (a child of ``parent``) with the best value of the parent's
    metric, and the line saying which one was taken.

    Raises:
        ConfigError: no such row, or no finished trial of it with the metric.
    """
    pid = parent.info.run_id
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{pid}'",
                                  max_results=10000)
    trials = [c for c in children if c.data.tags.get(TAG_ROLE) == "student" and TAG_ROW in c.data.tags]
    rows = list(dict.fromkeys(c.data.tags[TAG_ROW] for c in trials))
    if row not in rows:
        known = ", ".join(repr(r) for r in rows) or "none"
        raise ConfigError(f"--row '{row}' is not a row of run {pid} ({parent.info.run_name}); its rows: {known}")
    metric, mode = _search_metric(client, parent)
    done = [c for c in trials if c.data.tags[TAG_ROW] == row and c.info.status == "FINISHED"
            and math.isfinite(c.data.metrics.get(metric, math.nan))]
    if not done:
        raise ConfigError(f"row '{row}' of run {pid} has no FINISHED trial with a {metric}; nothing to export")
    pick = (max if mode == "max" else min)(done, key=lambda c: c.data.metrics[metric])
    values = ", ".join(f"seed {c.data.tags.get(TAG_SEED, '?')}: {c.data.metrics[metric]:.2f}"
                       for c in sorted(done, key=lambda c: int(c.data.tags.get(TAG_SEED, 0))))
    line = (f"kdsweep: row '{row}': took seed {pick.data.tags.get(TAG_SEED, '?')} (run {pick.info.run_id}), the "
            f"{'highest' if mode == 'max' else 'lowest'} {metric} of its {len(done)} finished seed(s) ({values})")
    return pick, line


def resolve_run(client: Any, run_id: str, row: str | None) -> tuple[Any, str | None]:
    """The trial run to export: ``run_id`` itself, or with ``row`` the best seed of that row of the
    parent run ``run_id`` (and the line saying so).

    Raises:
        ConfigError: an unknown run, ``--row`` on a run that is not a parent.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"run '{run_id}' is not in this MLflow store; pass a run id from `kdsweep ui` "
                          "(and --tracking-uri for another store)") from None
    if row is None:
        return run, None
    if run.data.tags.get(TAG_ROLE) in MODEL_NAME:
        raise ConfigError(f"--row: run {run_id} is a trial, not the parent run of an ablation; pass the parent's run id "
                          "with --row, or this run id without it")
    return best_seed(client, run, row)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "student"


def register(uri: str, model_uri: str, name: str, run: Any, metric: str = "AP") -> Any:
    """Register ``model_uri`` in the model registry as a new version of ``name``: the run's
    ``metric``, row and seed as the version's tags, and one line of them as its description."""
    import mlflow
    from mlflow.tracking import MlflowClient

    tags = run.data.tags
    value = run.data.metrics.get(metric)
    row, seed = tags.get(TAG_ROW, run.info.run_name), tags.get(TAG_SEED, "")
    version_tags = {"kdsweep.row": row, "kdsweep.seed": seed, "kdsweep.run_id": run.info.run_id,
                    "kdsweep.role": tags.get(TAG_ROLE, "")}
    if value is not None:
        version_tags[f"kdsweep.{metric}"] = f"{value:.4f}"
    if PARENT_TAG in tags:
        version_tags["kdsweep.parent_run_id"] = tags[PARENT_TAG]
    score = f"{metric} {value:.2f}" if value is not None else f"no {metric} logged"
    description = f"{row} (seed {seed}): {score}; run {run.info.run_id}"
    with tracking(uri):
        version = mlflow.register_model(model_uri, name, tags=version_tags)
    MlflowClient(tracking_uri=uri).update_model_version(name, version.version, description=description)
    return version


def run_export(args: argparse.Namespace) -> int:
    """``kdsweep export``: write the student of a trial run (or of a parent's row's best seed)."""
    from mlflow.tracking import MlflowClient

    uri = args.tracking_uri or default_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    run, line = resolve_run(client, args.run_id, args.row)
    if line:
        print(line, flush=True)
    model_uri, run = _run_model_uri(client, run.info.run_id, allow_checkpoint=True)
    if model_uri is None:  # finished before kdsweep logged models: its last checkpoint
        if args.register:
            raise ConfigError(f"run {run.info.run_id} logged no MLflow model to register (it finished before kdsweep "
                              "logged models); export it without --register")
        info, state, model_uri = _from_checkpoint(client, run, getattr(args, "storage_path", None))
    else:
        info, state = _read_mlflow(model_uri, uri)
    tags = run.data.tags
    source = {"run_id": run.info.run_id, "role": tags.get(TAG_ROLE), "row": tags.get(TAG_ROW),
              "seed": tags.get(TAG_SEED), "metrics": dict(run.data.metrics)}
    info = dataclasses.replace(info, source={**info.source, **{k: v for k, v in source.items() if v is not None}})
    model = _assemble(info, state, model_uri)
    out = Path(args.out) if args.out else Path(
        f"{_slug(tags.get(TAG_ROW) or tags.get(TAG_ROLE, 'student'))}-s{tags.get(TAG_SEED, 0)}-{run.info.run_id[:8]}"
        f"{FORMATS[args.format]}")
    if args.format == "pt":
        save_student(model, info, out)
    elif args.format == "torchscript":
        write_torchscript(model, out)
    else:
        write_onnx(model, out, tuple(args.image_size) if args.image_size else None)
    from kdsweep.report.throughput import count_inference_params

    params = count_inference_params(model) / 1e6
    ap = run.data.metrics.get("AP")
    print(f"kdsweep: wrote {out} ({args.format}: {describe(info.model)}, {info.num_classes} classes, "
          f"{params:.2f} M inference params{f', AP {ap:.2f}' if ap is not None else ''}) from run {run.info.run_id} "
          f"({model_uri})", flush=True)
    if args.register:
        version = register(uri, model_uri, args.register, run)
        print(f"kdsweep: registered it as {args.register} version {version.version} (models:/{args.register}/"
              f"{version.version})", flush=True)
    return 0

"""The preflight (kdsweep.orchestrate.preflight) and ``--dry-run``: every row of every shipped search space
builds, for every preset, exactly as its trials will build it (full-size ``paper`` models on the
meta device, torchvision downloads replaced by weights of the right shape)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdsweep.config import ConfigError
from kdsweep.presets import PRESETS
from kdsweep.orchestrate.space import load_space, parse_space
from kdsweep.orchestrate.trials import row_configs, variants

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
COCO_CLASSES = 80


def _configs(space, preset: str):
    return variants(space, row_configs(space, PRESETS[preset].experiment))


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_preset_builds_every_row_of_every_shipped_space(path: Path, preset: str) -> None:
    from kdsweep.orchestrate.preflight import preflight

    from kdsweep.config import merge

    space = load_space(path).for_preset(preset)  # as the launchers: the rows of this preset, the file's setting of it
    experiment = merge(PRESETS[preset].experiment, space.preset_experiment(preset))
    trials = variants(space, row_configs(space, experiment))
    rows = preflight(trials, COCO_CLASSES, space.source)
    assert [r.label for r in rows] == [label for label, _ in trials]
    assert {r.label for r in rows} == set(space.labels)
    for row, (_, exp) in zip(rows, trials):
        assert row.trainable_params > 0
        assert (row.teacher is not None) == bool(exp.kd)
        assert row.student.startswith(f"{exp.student.arch} {exp.student.backbone}")
        # the weights the trial starts from are the ones the preflight loaded (not dropped)
        assert (exp.student.weights or "random init") in row.student
        if row.teacher is not None:
            assert exp.teacher.backbone in row.teacher


def test_paper_models_are_full_size_and_cost_no_memory() -> None:
    """R101 -> R50 RetinaNet at 800x1333 with COCO's 80 classes, as the paper trains them."""
    from kdsweep.orchestrate.preflight import preflight

    space = load_space(ROOT / "search_spaces" / "ablation_ssim.yaml")
    [row] = preflight([t for t in _configs(space, "paper") if t[0] == "ssim"], COCO_CLASSES)
    assert row.teacher.startswith("retinanet resnet101 fpn256 800x1333 torchvision:ResNet101_Weights.IMAGENET1K_V1")
    assert row.student.startswith("retinanet resnet50 fpn256 800x1333 torchvision:ResNet50_Weights.IMAGENET1K_V1")
    # torchvision's RetinaNet R50-FPN has 34.0M parameters with 91 classes; ours, with 81 outputs
    # and FrozenBatchNorm2d (buffers, not parameters), has a few hundred thousand fewer
    student_m = float(row.student.split("(")[1].split("M")[0])
    assert 33.0 < student_m < 34.1


def test_offline_weights_fetch_nothing_and_have_the_right_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models._api as weights_api
    from torchvision.models import ResNet50_Weights, resnet50
    from torchvision.models._api import WeightsEnum

    from kdsweep.orchestrate.preflight import offline_weights

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", no_network)  # where torchvision downloads
    original = WeightsEnum.get_state_dict
    with torch.device("meta"), offline_weights():
        model = resnet50(weights=ResNet50_Weights.IMAGENET1K_V1)  # loads the shaped state strictly
    assert model.fc.weight.shape == (1000, 2048) and model.fc.weight.device.type == "meta"
    assert WeightsEnum.get_state_dict is original
    with pytest.raises(AssertionError, match="download"):
        ResNet50_Weights.IMAGENET1K_V1.get_state_dict()


def test_the_preflight_uses_the_trials_own_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    """One teacher build per distinct teacher, one student build per configuration, through
    kdsweep.train.model.build_model (what every Ray Train worker calls; a teacher's run config is
    the experiment with the teacher as the student and no KD terms)."""
    import kdsweep.orchestrate.preflight
    from kdsweep.train.model import build_model

    calls = []

    def spy(exp, num_classes, teacher_state=None):
        teacher_run = not exp.kd and exp.student == exp.teacher and exp.train == exp.teacher_train
        calls.append(("teacher" if teacher_run else "student", teacher_state is not None))
        return build_model(exp, num_classes, teacher_state)

    monkeypatch.setattr(kdsweep.orchestrate.preflight, "build_model", spy)
    space = load_space(ROOT / "search_spaces" / "ablation_ssim.yaml")
    kdsweep.orchestrate.preflight.preflight(_configs(space, "smoke"), 6)
    assert calls[0] == ("student", False)  # the baseline: no teacher
    assert calls.count(("teacher", False)) == 1  # every KD row shares one teacher configuration
    assert calls.count(("student", True)) == len(space.labels) - 1


def test_a_model_that_rejects_its_weights_fails_before_anything_starts() -> None:
    from kdsweep.orchestrate.preflight import preflight

    space = parse_space({"rows": [{"label": "m", "student": {
        "arch": "mimicdet", "weights": "torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1"}}]}, "bad.yaml")
    with pytest.raises(ConfigError) as info:
        preflight(_configs(space, "paper"), COCO_CLASSES, space.source)
    message = str(info.value)
    assert message.startswith("bad.yaml: row 'm': student.weights 'torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1'")
    assert "torchvision:ResNet50_Weights.IMAGENET1K_V1" in message and "\n" not in message


# ------------------------------------------------------------------------------------ --dry-run
@pytest.fixture()
def no_services(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import kdsweep.orchestrate.ablation

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run started Ray")

    monkeypatch.setattr(kdsweep.orchestrate.ablation, "init_ray", refuse)
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


@pytest.mark.parametrize("name", ["ablation_ssim", "ablation_scalekd", "ablation_mimic"])
def test_dry_run_of_each_ablation_launcher(name: str, no_services: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdsweep.orchestrate.ablation import run_ablation

    space = load_space(ROOT / "search_spaces" / f"{name}.yaml")
    assert run_ablation(space.source, ["--preset", "paper", "--dry-run", "--seeds", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{space.source} [paper]: valid; {2 * len(space.labels)} trial(s): {len(space.labels)} row(s) x 2 seed(s), as many at once as the cluster holds (auto)"
    assert out[1].startswith("  data: synthetic")
    assert [line.split(":")[0].strip() for line in out[2:-1]] == space.labels  # one line per row
    assert out[-1].startswith("  the paper reports (paper setting): ")  # then the paper's number
    assert not (no_services / "mlflow").exists() and not (no_services / "ray_results").exists()


def test_dry_run_validates_a_given_dataset(no_services: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdsweep.orchestrate.ablation import run_ablation
    from kdsweep.config import DataConfig
    from kdsweep.data.synthetic import ensure_synthetic

    root = ensure_synthetic(DataConfig(synth_train=8, synth_val=3, synth_size=64))
    space = ROOT / "search_spaces" / "ablation_ssim.yaml"
    assert run_ablation(space, ["--preset", "smoke", "--dry-run", "--data", str(root), "--rows", "baseline,ssim"]) == 0
    out = capsys.readouterr().out
    assert "(8 images)" in out and "(3 images)" in out and "valid" in out
    # fewer training images than one step of the smoke preset's batch of 8: what the launch refuses
    small = ensure_synthetic(DataConfig(synth_train=4, synth_val=3, synth_size=64))
    capsys.readouterr()  # the generator's progress lines
    assert run_ablation(space, ["--preset", "smoke", "--dry-run", "--data", str(small), "--rows", "baseline"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 training image(s) are fewer than one step's train.batch_size 8" in err[0]
    (root / "val.json").write_text("{")
    assert run_ablation(space, ["--preset", "smoke", "--dry-run", "--data", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val.json" in err[0] and "not valid JSON" in err[0]


def test_the_mimicdet_paper_launch_validates(tmp_path: Path) -> None:
    """The launcher as a user runs it: before the fix the preflight dropped the ImageNet weights
    that MimicDet rejected, and every student failed after the teacher had trained."""
    import os

    env = dict(os.environ, KDSWEEP_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "ablation_mimicdet.py"), "--preset", "paper", "--dry-run"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "7 trial(s)" in out.stdout
    assert "student mimicdet resnet50 fpn256 800x1333 torchvision:ResNet50_Weights.IMAGENET1K_V1" in out.stdout
    assert "Traceback" not in out.stderr

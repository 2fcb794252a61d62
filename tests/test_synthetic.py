"""Synthetic dataset: deterministic, small-object heavy, valid COCO, generated once and reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from kdsweep.cli import main
from kdsweep.config import DataConfig
from kdsweep.data import synthetic
from kdsweep.data.coco import MEDIUM, SMALL, validate_coco
from kdsweep.data.synthetic import MARKER, ensure_synthetic, generate

TRAIN, VAL, SIZE = 24, 8, 128


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("synth") / "s0", train=TRAIN, val=VAL, size=SIZE, seed=0, progress=False)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _boxes(written: dict[str, Path]) -> list[list[float]]:
    return [a["bbox"] for split in ("train", "val") for a in _load(written[split])["annotations"]]


def test_layout_and_counts(dataset):
    root = dataset["images"].parent
    assert dataset == {"train": root / "train.json", "val": root / "val.json", "images": root / "images"}
    assert (root / MARKER).is_file()
    train, val = _load(dataset["train"]), _load(dataset["val"])
    assert len(train["images"]) == TRAIN and len(val["images"]) == VAL
    assert [im["id"] for im in train["images"]] == list(range(1, TRAIN + 1))
    assert len(list(dataset["images"].iterdir())) == TRAIN + VAL
    assert train["categories"] == val["categories"]
    assert [c["name"] for c in train["categories"]] == list(synthetic.CLASSES)


def test_same_seed_is_byte_identical_and_other_seed_differs(dataset, tmp_path):
    again = generate(tmp_path / "again", train=TRAIN, val=VAL, size=SIZE, seed=0, progress=False)
    other = generate(tmp_path / "other", train=TRAIN, val=VAL, size=SIZE, seed=1, progress=False)
    for split in ("train", "val"):
        assert again[split].read_bytes() == dataset[split].read_bytes()
        assert other[split].read_bytes() != dataset[split].read_bytes()
    name = "val_000003.jpg"
    assert (again["images"] / name).read_bytes() == (dataset["images"] / name).read_bytes()
    assert (other["images"] / name).read_bytes() != (dataset["images"] / name).read_bytes()
    assert _boxes(other) != _boxes(dataset)


def test_scale_mix_is_small_object_heavy(dataset):
    areas = [w * h for _, _, w, h in _boxes(dataset)]
    assert len(areas) >= 3 * (TRAIN + VAL)  # 3-12 objects per image, a few dropped as occluded
    small = sum(a < SMALL for a in areas)
    medium = sum(SMALL <= a < MEDIUM for a in areas)
    large = sum(a >= MEDIUM for a in areas)
    assert small / len(areas) >= 0.40
    assert medium > 0 and large > 0


def test_boxes_lie_inside_the_image(dataset):
    for split in ("train", "val"):
        coco = _load(dataset[split])
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        assert set(sizes.values()) == {(SIZE, SIZE)}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE, ann
            assert ann["area"] == pytest.approx(w * h, abs=0.01)
            assert ann["iscrowd"] == 0 and 0.5 <= ann["visibility"] <= 1.0


def test_at_least_five_classes_are_used(dataset):
    used = {a["category_id"] for split in ("train", "val") for a in _load(dataset[split])["annotations"]}
    assert len(used) >= 5
    assert used <= {c["id"] for c in _load(dataset["train"])["categories"]}


def test_images_are_readable_rgb_of_the_requested_size(dataset):
    for split in ("train", "val"):
        for info in _load(dataset[split])["images"]:
            with Image.open(dataset["images"] / info["file_name"]) as handle:
                handle.load()
                assert handle.mode == "RGB" and handle.size == (SIZE, SIZE)


def test_generate_refuses_to_replace_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a kdsweep synthetic dataset"):
        generate(foreign, train=1, val=0, size=64, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_synth_writes_and_rejects_bad_input_without_traceback(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "synth", "--out", str(out), "--train", "2", "--val", "1", "--size", "64"]) == 0
    assert len(_load(out / "train.json")["images"]) == 2 and validate_coco(out / "val.json").ok
    capsys.readouterr()
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--size", "48"]) == 2  # generate() needs >= 64
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--seed", "-1"]) == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["data", "synth", "--out", str(foreign), "--train", "1", "--val", "0", "--size", "64"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("kdsweep data synth: ") and "choose another --out" in err
    assert not (tmp_path / "x").exists()


def test_ensure_synthetic_generates_once_then_reuses(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    cfg = DataConfig(synth_train=TRAIN, synth_val=VAL, synth_size=SIZE, synth_seed=0)
    root = ensure_synthetic(cfg)
    assert root == tmp_path / "home" / "data" / f"synth-{SIZE}-{TRAIN}-{VAL}-s0"
    for split in ("train", "val"):  # same settings as generate(seed=0): the same data
        assert (root / f"{split}.json").read_bytes() == dataset[split].read_bytes()
        report = validate_coco(root / f"{split}.json", root / "images")
        assert report.problems == []
        assert report.num_images == (TRAIN if split == "train" else VAL)
    stamps = {p.name: p.stat().st_mtime_ns for p in (root / "train.json", root / "val.json", root / MARKER)}

    def fail(*args, **kwargs):
        raise AssertionError("ensure_synthetic regenerated a complete dataset")

    monkeypatch.setattr(synthetic, "generate", fail)
    assert ensure_synthetic(cfg) == root
    assert {p.name: p.stat().st_mtime_ns for p in (root / "train.json", root / "val.json", root / MARKER)} == stamps


def test_simple_style_has_no_clutter_and_keeps_small_objects(tmp_path):
    import json

    from kdsweep.config import DataConfig
    from kdsweep.data.synthetic import synth_name

    out = generate(tmp_path / "simple", train=24, val=0, size=128, seed=0, progress=False, style="simple")
    coco = json.loads(out["train"].read_text())
    stats = coco["info"]["stats"]
    assert stats["distractors_drawn"] == 0 and stats["occluders_drawn"] == 0
    assert coco["info"]["style"] == "simple"
    per_image = [sum(a["image_id"] == im["id"] for a in coco["annotations"]) for im in coco["images"]]
    assert max(per_image) <= 8
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]]
    assert min(sides) >= 6.0  # radius >= 5 px
    assert sum(a["area"] < 32 * 32 for a in coco["annotations"]) / len(sides) >= 0.4
    assert synth_name(DataConfig(synth_style="simple")).endswith("-simple")
    assert synth_name(DataConfig()) == "synth-192-600-150-s0"  # the default keeps its old folder name
    with pytest.raises(ValueError, match="style 'busy' is unknown"):
        generate(tmp_path / "x", train=1, val=0, size=64, progress=False, style="busy")

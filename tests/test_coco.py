"""COCO validation (one line per problem, naming file/id/field), ``data check``, the dataset, paths."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from kdsweep.cli import main
from kdsweep.config import DataConfig
from kdsweep.data.coco import DataError, load_validated, resolve_data, validate_coco
from kdsweep.data.dataset import CocoDetection

W, H = 160, 128  # not square, so a transposed image or box shows
COLOURS = {"a.png": (200, 40, 0), "b.png": (0, 90, 250), "c.png": (10, 10, 10)}


def _valid() -> dict[str, Any]:
    """Three images (c has no boxes), non-contiguous category ids 3 and 7, one crowd box."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},
            {"id": 3, "file_name": "c.png", "width": W, "height": H},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 20, 10, 8], "area": 80, "iscrowd": 0},  # small
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50.5, 30, 40, 40], "area": 1600, "iscrowd": 0},  # medium
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 150, 100], "area": 15000, "iscrowd": 0},  # large
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [5, 5, 30, 30], "area": 900, "iscrowd": 1},  # crowd
        ],
        "categories": [{"id": 7, "name": "bus"}, {"id": 3, "name": "car"}],
    }


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """A folder with ``images/`` holding a.png, b.png, c.png (solid colours), a broken file."""
    images = tmp_path / "images"
    images.mkdir()
    for name, colour in COLOURS.items():
        Image.fromarray(np.full((H, W, 3), colour, dtype=np.uint8)).save(images / name)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    buf = images / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(buf, quality=90)
    data = buf.read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return tmp_path


def _write(root: Path, name: str, data: Any) -> Path:
    path = root / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _edit(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(_valid())
    fn(data)
    return data


def _ann(i: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda d: next(a for a in d["annotations"] if a["id"] == i)


# (case name, file content, substrings the single problem line must contain)
CASES: list[tuple[str, Any, tuple[str, ...]]] = [
    ("non_json", '{"images": [', ("not valid JSON",)),
    ("top_level_list", [1, 2, 3], ("top level must be an object",)),
    ("missing_top_key", {"images": [], "categories": []}, ("'annotations'",)),
    ("missing_record_key", _edit(lambda d: _ann(2)(d).pop("bbox")), ("annotation 2", "'bbox'")),
    ("duplicate_image_id", _edit(lambda d: d["images"].append({"id": 2, "file_name": "c.png", "width": W, "height": H})),
     ("image 2", "duplicate id")),
    ("duplicate_annotation_id", _edit(lambda d: d["annotations"].append({**_ann(1)(d)})), ("annotation 1", "duplicate id")),
    ("unknown_image_id", _edit(lambda d: _ann(3)(d).update(image_id=99)), ("annotation 3", "image_id 99")),
    ("unknown_category_id", _edit(lambda d: _ann(1)(d).update(category_id=42)), ("annotation 1", "category_id 42")),
    ("non_numeric_bbox", _edit(lambda d: _ann(2)(d).update(bbox=["10", 1, 2, 3])), ("annotation 2", "bbox")),
    ("wrong_length_bbox", _edit(lambda d: _ann(1)(d).update(bbox=[1, 2, 3])), ("annotation 1", "bbox", "[1, 2, 3]")),
    ("nan_bbox", _edit(lambda d: _ann(3)(d).update(bbox=[0, 0, math.nan, 10])), ("annotation 3", "bbox", "nan")),
    ("non_positive_box_width", _edit(lambda d: _ann(1)(d).update(bbox=[10, 20, 0, 8])), ("annotation 1", "non-positive width")),
    ("box_outside_image", _edit(lambda d: _ann(2)(d).update(bbox=[150, 30, 40, 40])), ("annotation 2", "outside image 1")),
    ("non_positive_image_size", _edit(lambda d: d["images"][2].update(width=0)), ("image 3", "width/height", "0x128")),
    ("missing_image_file", _edit(lambda d: d["images"][1].update(file_name="nope.png")), ("image 2", "file_name", "nope.png", "not found")),
    ("unreadable_image_file", _edit(lambda d: d["images"][0].update(file_name="broken.jpg")), ("image 1", "broken.jpg", "not a readable image")),
    ("truncated_image_file", _edit(lambda d: d["images"][0].update(file_name="truncated.jpg")), ("image 1", "truncated.jpg", "not a readable image")),
    ("image_size_mismatch", _edit(lambda d: d["images"][2].update(height=100)), ("image 3", "c.png", "160x128", "160x100")),
    ("unhashable_annotation_id", _edit(lambda d: _ann(2)(d).update(id=[2])), ("annotation #1", "'id'")),
    ("unhashable_image_id_ref", _edit(lambda d: _ann(1)(d).update(image_id=[1])), ("annotation 1", "image_id [1]")),
    ("no_annotations", _edit(lambda d: d.update(annotations=[])), ("no annotations", "3 image(s)")),
    ("no_images", {"images": [], "annotations": [], "categories": [{"id": 1, "name": "car"}]},
     ("field 'images' is empty", "no image to train or evaluate on", "use an instances file that lists its images")),
    # training sorts category ids and keys images by integer id: a string among integers cannot be
    ("string_category_id", _edit(lambda d: d["categories"].append({"id": "9", "name": "truck"})),
     ("category #2", "field 'id' '9' must be an integer", "give every category an integer id")),
    ("string_image_id", _edit(lambda d: d["images"].append({"id": "4", "file_name": "c.png", "width": W, "height": H})),
     ("image #3", "field 'id' '4' must be an integer", "give every image an integer id")),
    ("string_annotation_id", _edit(lambda d: d["annotations"].append({**_ann(1)(d), "id": "a5"})),
     ("annotation #4", "field 'id' 'a5' must be an integer", "give every annotation an integer id")),
    ("huge_image_id", _edit(lambda d: d["images"].append({"id": 10**400, "file_name": "c.png", "width": W, "height": H})),
     ("image #3", "must be an integer (training needs 64-bit integer COCO ids)")),
    ("bool_category_id_ref", _edit(lambda d: d["categories"].append({"id": 1, "name": "van"}) or _ann(1)(d).update(category_id=True)),
     ("annotation 1", "category_id True is not a category id")),
]


@pytest.mark.parametrize(("name", "content", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_malformed_file_gives_one_problem_naming_file_and_field(root, name, content, expected):
    path = _write(root, f"{name}.json", content)
    report = validate_coco(path)
    assert len(report.problems) == 1, report.problems
    line = report.problems[0]
    assert line.startswith(f"{name}.json: ")
    for part in expected:
        assert part in line, (part, line)
    assert "\n" not in line
    assert not report.ok


def test_images_without_boxes_beside_images_with_boxes_are_valid(root):
    data = _edit(lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != 3]))
    assert len({a["image_id"] for a in data["annotations"]}) < len(data["images"])
    report = validate_coco(_write(root, "some_empty.json", data))
    assert report.ok and report.num_images == 3


def test_valid_file_has_no_problems_and_counts(root):
    report = validate_coco(_write(root, "ok.json", _valid()))
    assert report.problems == [] and report.ok
    assert (report.num_images, report.num_annotations) == (3, 4)
    assert report.class_counts == {"car": 2, "bus": 1}  # the crowd box is not counted
    assert report.size_counts == {"small": 1, "medium": 1, "large": 1}


def test_problem_lines_are_capped_per_kind(root):
    data = _valid()
    data["annotations"] = [{"id": i, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]} for i in range(1, 31)]
    report = validate_coco(_write(root, "many.json", data))
    assert len(report.problems) == 21
    assert report.problems[-1] == "many.json: ... and 10 more ann-cat problems"
    assert report.num_problems == 30


def test_cli_check_counts_every_problem_when_lines_are_capped(root, capsys):
    data = _valid()
    data["annotations"] = [{"id": i, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]} for i in range(1, 31)]
    assert main(["data", "check", str(_write(root, "many.json", data))]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 22 and err[-1] == "30 problem(s) found"


@pytest.mark.parametrize(("name", "content", "expected"), CASES, ids=[c[0] for c in CASES])
def test_cli_check_reports_problems_without_traceback(root, capsys, name, content, expected):
    path = _write(root, f"{name}.json", content)
    problems = validate_coco(path).problems
    assert main(["data", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines() == problems + [f"{len(problems)} problem(s) found"]


def test_cli_check_valid_file_prints_counts(root, capsys):
    path = _write(root, "ok.json", _valid())
    assert main(["data", "check", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0] == f"{path}: 3 images, 4 annotations"
    assert "per class: bus 1, car 2" in lines
    assert "by size:   small 1 (33%), medium 1 (33%), large 1 (33%)" in lines
    assert lines[-1] == "ok"


def test_cli_check_images_option(root, tmp_path_factory, capsys):
    elsewhere = tmp_path_factory.mktemp("ann") / "ok.json"
    elsewhere.write_text(json.dumps(_valid()))
    assert main(["data", "check", str(elsewhere)]) == 1  # no images/ beside it
    assert "image folder" in capsys.readouterr().err
    assert main(["data", "check", str(elsewhere), "--images", str(root / "images")]) == 0


def test_load_validated(root):
    bad = _write(root, "bad.json", _edit(lambda d: _ann(1)(d).update(category_id=42)))
    with pytest.raises(DataError) as info:
        load_validated(bad)
    assert "bad.json" in str(info.value) and "annotation 1" in str(info.value)
    report = load_validated(_write(root, "ok.json", _valid()), root / "images")
    assert report.ok and report.num_annotations == 4


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(images=[], annotations=[]), "field 'images' is empty"),
    (lambda d: d["categories"][0].update(id="7") or [a.update(category_id="7") for a in d["annotations"] if a["category_id"] == 7],
     "category #0: field 'id' '7' must be an integer (training needs 64-bit integer COCO ids); give every category an integer id "
     "(and 2 more problem(s); `kdsweep data check"),
])
def test_load_validated_refuses_what_the_launch_cannot_train_on_in_one_line(root, edit, expected):
    """An empty file and mixed category ids: refused before the compact conversion (which sorts
    the ids: a TypeError for 3 and '7'), in the one line a launch prints."""
    path = _write(root, "train.json", _edit(edit))
    with pytest.raises(DataError) as info:
        load_validated(path, root / "images", use_cache=False)
    assert str(info.value).startswith(f"{path}: {expected}") and "\n" not in str(info.value)


def test_a_clean_result_remembered_under_earlier_rules_is_checked_again(root, tmp_path, monkeypatch):
    """A file an earlier version passed (string category ids were then fine) is validated again
    under today's rules, not waved through by the remembered result."""
    from kdsweep import paths as kdsweep_paths

    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    path = _write(root, "train.json", _edit(lambda d: d["categories"].append({"id": "9", "name": "truck"})))
    old_key = kdsweep_paths.file_version_key(path, str((root / "images").resolve()))  # the key before the rules' version
    stamp = kdsweep_paths.home() / "validated" / f"{old_key}-headers.json"
    stamp.parent.mkdir(parents=True)
    stamp.write_text(json.dumps({"num_images": 3, "num_annotations": 4}))
    with pytest.raises(DataError, match="field 'id' '9' must be an integer"):
        load_validated(path, root / "images")


def test_dataset_items_shapes_dtypes_and_labels(root):
    ds = CocoDetection(_write(root, "ok.json", _valid()), root / "images")
    assert len(ds) == 3 and ds.num_classes == 2
    assert ds.categories == ["car", "bus"]  # sorted by category id 3, 7
    assert ds.label_to_cat_id == {1: 3, 2: 7}

    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, H, W)  # converted to float on the device
    assert image[:, 0, 0].tolist() == list(COLOURS["a.png"])
    assert target["image_id"] == 1
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (2, 4)
    assert torch.equal(target["boxes"], torch.tensor([[10, 20, 20, 28], [50.5, 30, 90.5, 70]], dtype=torch.float32))
    assert target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [1, 2]

    _, target = ds[1]  # the crowd box is left out
    assert target["boxes"].tolist() == [[0, 0, 150, 100]] and target["labels"].tolist() == [1]

    _, target = ds[2]  # no annotations
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_max_images_truncates_and_coco_gt_follows(root):
    ds = CocoDetection(_write(root, "ok.json", _valid()), root / "images", max_images=1)
    assert len(ds) == 1 and ds.image_ids == [1]
    gt = ds.coco_gt
    assert gt.getImgIds() == [1]
    assert sorted(gt.getAnnIds()) == [1, 2]
    assert sorted(gt.getCatIds()) == [3, 7]
    full = CocoDetection(root / "ok.json", root / "images")
    assert sorted(full.coco_gt.getAnnIds()) == [1, 2, 3, 4]


def _synth_layout(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    for split in ("train", "val"):
        (folder / f"{split}.json").write_text(json.dumps(_valid()))
    return folder


def test_resolve_data_root(tmp_path):
    root = _synth_layout(tmp_path / "data")
    paths = resolve_data(DataConfig(root=str(root)))
    assert paths.train_ann == root / "train.json" and paths.val_ann == root / "val.json"
    assert paths.train_images == paths.val_images == root / "images"


def test_resolve_data_annotation_files(tmp_path):
    root = _synth_layout(tmp_path / "data")
    images = tmp_path / "pics"
    images.mkdir()
    paths = resolve_data(DataConfig(train_ann=str(root / "train.json"), val_ann=str(root / "val.json"), images=str(images)))
    assert (paths.train_ann, paths.val_ann) == (root / "train.json", root / "val.json")
    assert paths.train_images == paths.val_images == images
    # without images: images/ beside each JSON
    paths = resolve_data(DataConfig(train_ann=str(root / "train.json"), val_ann=str(root / "val.json")))
    assert paths.train_images == root / "images"


def test_resolve_data_errors(tmp_path):
    root = _synth_layout(tmp_path / "data")
    (root / "val.json").unlink()
    with pytest.raises(DataError, match=r"val\.json: annotation file not found"):
        resolve_data(DataConfig(root=str(root)))
    with pytest.raises(DataError, match="both train_ann and val_ann"):
        resolve_data(DataConfig(train_ann=str(root / "train.json")))
    with pytest.raises(DataError, match="image folder not found"):
        resolve_data(DataConfig(train_ann=str(root / "train.json"), val_ann=str(root / "train.json"),
                                images=str(tmp_path / "missing")))


@pytest.fixture()
def spied(tmp_path: Path, monkeypatch) -> tuple[Any, Path, list[dict[str, Any]]]:
    """``(kdsweep.data.coco, a synthetic dataset folder, the keyword arguments of every
    validate_coco call)``, with KDSWEEP_HOME under tmp_path."""
    import kdsweep.data.coco as coco_mod
    from kdsweep.data.synthetic import generate

    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    root = tmp_path / "ds"
    generate(root, train=3, val=1, size=64, seed=0, progress=False)
    calls: list[dict[str, Any]] = []
    real = coco_mod.validate_coco
    monkeypatch.setattr(coco_mod, "validate_coco", lambda *a, **k: calls.append(k) or real(*a, **k))
    return coco_mod, root, calls


def test_load_validated_remembers_a_clean_result_until_the_file_changes(spied):
    coco_mod, root, calls = spied
    first = coco_mod.load_validated(root / "train.json", root / "images")
    again = coco_mod.load_validated(root / "train.json", root / "images")
    assert len(calls) == 1 and again.num_images == first.num_images == 3
    coco_mod.load_validated(root / "train.json", root / "images", use_cache=False)
    assert len(calls) == 2
    data = json.loads((root / "train.json").read_text())
    data["annotations"].append({"id": 999999, "image_id": -5, "category_id": 1, "bbox": [0, 0, 1, 1]})
    (root / "train.json").write_text(json.dumps(data))
    with pytest.raises(coco_mod.DataError, match="image_id -5"):
        coco_mod.load_validated(root / "train.json", root / "images")


def test_dataset_clips_boxes_to_the_image_and_drops_slivers(root):
    data = _valid()
    data["annotations"] = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [-0.5, 10, 20, 10]},  # within the 1 px tolerance
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [150, 100, 10.8, 28.6]},  # ends 0.8/0.6 px outside
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [159.995, 5, 0.9, 5]},  # a sliver once clipped
    ]
    path = _write(root, "edge.json", data)
    assert validate_coco(path).ok
    _, target = CocoDetection(path, root / "images")[0]
    assert target["boxes"].tolist() == [[0, 10, 19.5, 20], [150, 100, W, H]]
    assert target["labels"].tolist() == [1, 2]


def test_dataset_names_an_unreadable_image_instead_of_a_decoder_traceback(root):
    data = _valid()
    data["images"][1]["file_name"] = "broken.jpg"
    ds = CocoDetection(_write(root, "broken.json", data), root / "images")
    image, _ = ds[0]
    assert image.is_contiguous()
    with pytest.raises(DataError, match=r"broken\.json: image 2: file_name 'broken\.jpg' is not a readable image"):
        ds[1]


def test_the_parallel_check_finds_what_the_serial_one_finds(root, monkeypatch):
    import kdsweep.data.image_check as image_check

    data = _valid()
    data["images"][1]["file_name"] = "truncated.jpg"
    data["images"][2]["file_name"] = "nowhere.png"
    path = _write(root, "mixed.json", data)
    serial = validate_coco(path)
    monkeypatch.setattr(image_check, "SERIAL_BELOW", 1)  # a pool of threads, chunks of 1
    monkeypatch.setattr(image_check, "CHUNK", 1)
    seen = []
    parallel = validate_coco(path, progress=lambda done, total: seen.append((done, total)))
    assert parallel.problems == serial.problems and len(serial.problems) == 2
    assert seen[-1] == (3, 3) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_headers_only_checks_existence_and_sizes_but_not_the_whole_file(root):
    data = _valid()
    data["images"][1]["file_name"] = "truncated.jpg"  # a cut-off JPEG: its header is intact
    data["images"][1].update(width=W, height=H)
    path = _write(root, "cut.json", data)
    assert "not a readable image" in " ".join(validate_coco(path).problems)  # the full decode catches it
    assert validate_coco(path, decode=False).ok  # the header says 160x128, as the file does
    data["images"][0]["width"] = W + 1
    data["images"][2]["file_name"] = "nowhere.png"
    problems = " ".join(validate_coco(_write(root, "cut2.json", data), decode=False).problems)
    assert "a.png' is 160x128 but width/height say 161x128" in problems and "'nowhere.png' not found" in problems


def test_a_full_decode_stands_for_a_header_check_not_the_other_way(spied):
    coco_mod, root, calls = spied
    coco_mod.load_validated(root / "train.json", root / "images")  # a launch: headers
    coco_mod.load_validated(root / "train.json", root / "images", decode=True)  # headers do not stand for a decode
    coco_mod.load_validated(root / "val.json", root / "images", decode=True)
    coco_mod.load_validated(root / "val.json", root / "images")  # a decode stands for headers
    assert [k["decode"] for k in calls] == [False, True, True]


def test_cli_check_decodes_in_full_unless_told_headers_only(root, capsys):
    data = _valid()
    data["images"][1]["file_name"] = "truncated.jpg"
    path = _write(root, "cut.json", data)
    assert main(["data", "check", str(path)]) == 1
    assert "truncated.jpg' is not a readable image" in capsys.readouterr().err
    assert main(["data", "check", str(path), "--headers-only"]) == 0


def _version(root: Path) -> str:
    from kdsweep.data.coco import data_version

    return data_version(resolve_data(DataConfig(root=str(root))))


def test_the_data_version_follows_the_content_not_the_path_or_the_clock(tmp_path, monkeypatch):
    """Issue 24: the teacher's identity includes the data's version (here: annotation bytes, sizes
    of the referenced images). Edited at the same path -> another version; touched or copied byte for byte -> the same."""
    import os
    import shutil

    from kdsweep.data.synthetic import generate

    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    root = tmp_path / "ds"
    generate(root, train=3, val=1, size=64, seed=0, progress=False, workers=1)
    first = _version(root)
    assert len(first) == 20 and _version(root) == first
    os.utime(root / "train.json", ns=(1, 1))  # only the clock moves
    assert _version(root) == first
    shutil.copytree(root, tmp_path / "copy")
    assert _version(tmp_path / "copy") == first
    data = json.loads((root / "train.json").read_text())
    data["annotations"][0]["bbox"][0] += 1.0  # one box moved by 1 px, the file rewritten in place
    (root / "train.json").write_text(json.dumps(data))
    edited = _version(root)
    assert edited != first
    image = next((root / "images").glob("val_*.jpg"))  # an image replaced by another (another size)
    image.write_bytes(image.read_bytes() + b"\0")
    assert _version(root) not in (first, edited)


def test_the_data_version_ignores_files_the_annotations_do_not_reference(tmp_path, monkeypatch):
    """``--images`` may point at a whole COCO root: a file no annotation references, added or
    changed beside the images or in a sibling folder (test2017, stray outputs), is not the data's
    version (it would silently retrain the teacher), and that folder is not walked."""
    from kdsweep.data.synthetic import generate

    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    root = tmp_path / "ds"
    generate(root, train=3, val=1, size=64, seed=0, progress=False, workers=1)
    first = _version(root)
    (root / "images" / "extra.jpg").write_bytes(b"x")  # an unreferenced file beside the images
    (root / "images" / "test2017").mkdir()
    (root / "images" / "test2017" / "000000000001.jpg").write_bytes(b"xyz")  # a sibling subfolder
    assert _version(root) == first
    (root / "images" / "extra.jpg").write_bytes(b"longer")  # changed
    assert _version(root) == first
    (root / "images" / "loop").symlink_to(root / "images")  # a symlink cycle: never followed
    assert _version(root) == first


def test_the_data_version_follows_the_size_of_each_referenced_image_and_survives_a_missing_one(tmp_path, monkeypatch):
    """A referenced image of another size is another version; a referenced image that is missing
    gives a version (validation reports it, this does not raise), and putting it back restores it."""
    from kdsweep.data.synthetic import generate

    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    root = tmp_path / "ds"
    generate(root, train=3, val=1, size=64, seed=0, progress=False, workers=1)
    first = _version(root)
    image = next((root / "images").glob("train_*.jpg"))
    content = image.read_bytes()
    image.write_bytes(content + b"\0")  # one referenced image, one byte longer
    grown = _version(root)
    assert grown != first
    image.unlink()  # missing: counted with size -1
    missing = _version(root)
    assert len(missing) == 20 and missing not in (first, grown)
    image.write_bytes(content)
    assert _version(root) == first


def test_the_embedded_synthetic_data_regenerated_keeps_its_version_other_content_gets_another(tmp_path, monkeypatch):
    """The synthetic dataset is generated on first use, deterministically in its seed: generated
    again at the same path (a wiped KDSWEEP_HOME/data) it is the same version, so its teacher is
    reused; other content regenerated at the same path is another version (its teacher retrains)."""
    import shutil

    from kdsweep.data.synthetic import ensure_synthetic, generate

    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    cfg = DataConfig(synth_train=2, synth_val=1, synth_size=64)
    root = ensure_synthetic(cfg)
    first = data_version_of(cfg)
    shutil.rmtree(root)
    assert ensure_synthetic(cfg) == root and data_version_of(cfg) == first
    generate(root, train=2, val=1, size=64, seed=7, progress=False, workers=1)  # other content, same path
    assert data_version_of(cfg) != first


def data_version_of(cfg: DataConfig) -> str:
    from kdsweep.data.coco import data_version

    return data_version(resolve_data(cfg))

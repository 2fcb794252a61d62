"""VisDrone-DET -> COCO: dropped categories, painted ignored regions, clipping, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdsweep.cli import main
from kdsweep.data.coco import DataError, validate_coco
from kdsweep.data.visdrone import CATEGORIES, convert_visdrone

# image a: 96 x 64, left half red, right half blue
A_LINES = [
    "16,16,32,32,0,0,0,0",  # ignored region (category 0): painted, dropped
    "60,5,10,12,1,4,0,1",  # car: kept as is
    "50,40,8,8,1,11,0,0",  # others (11): dropped
    "70,30,10,10,0,1,0,0",  # score 0: dropped
    "90,50,20,30,1,9,1,0",  # bus crossing the right/bottom border: clipped to 6 x 14
    "-4,40,10,10,1,10,0,0",  # motor crossing the left border: clipped to 6 x 10
    "5,50,0,7,1,1,0,0",  # zero width: dropped
    "20,20,10,10,1,4,0,0",  # car inside the ignored region: painted over, dropped
    "2,2,5,5,1,1,0,2,",  # pedestrian, trailing comma as in some releases
]
B_LINES = ["1,1,10,10,1,2,0,0", ""]  # image b: 64 x 48, no ignored region


def _write_split(root: Path, a_lines: list[str] = A_LINES) -> Path:
    src = root / "VisDrone2019-DET-val"
    (src / "images").mkdir(parents=True)
    (src / "annotations").mkdir()
    a = np.zeros((64, 96, 3), dtype=np.uint8)
    a[:, :48] = (200, 0, 0)
    a[:, 48:] = (0, 0, 200)
    Image.fromarray(a).save(src / "images" / "0000001_00000_d_0000001.jpg", quality=95)
    b = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(b).save(src / "images" / "0000002_00000_d_0000002.jpg", quality=95)
    (src / "annotations" / "0000001_00000_d_0000001.txt").write_text("\n".join(a_lines) + "\n")
    (src / "annotations" / "0000002_00000_d_0000002.txt").write_text("\n".join(B_LINES) + "\n")
    return src


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as handle:
        return np.asarray(handle.convert("RGB"), dtype=np.float64)


def test_convert_keeps_the_benchmark_boxes_and_paints_ignored_regions(tmp_path):
    src = _write_split(tmp_path)
    out = tmp_path / "coco"
    written = convert_visdrone(src, out)
    assert written == {"val": out / "val.json", "images": out / "images"}
    coco = json.loads((out / "val.json").read_text())

    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    assert [c["name"] for c in coco["categories"]] == list(CATEGORIES)
    assert CATEGORIES[0] == "pedestrian" and CATEGORIES[-1] == "motor"
    images = {im["file_name"]: im for im in coco["images"]}
    assert {(im["width"], im["height"]) for im in images.values()} == {(96, 64), (64, 48)}
    a_id = images["0000001_00000_d_0000001.jpg"]["id"]
    b_id = images["0000002_00000_d_0000002.jpg"]["id"]

    got = sorted((a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"])
    assert got == sorted([
        (a_id, 4, [60, 5, 10, 12]),  # car
        (a_id, 9, [90, 50, 6, 14]),  # bus, clipped
        (a_id, 10, [0, 40, 6, 10]),  # motor, clipped
        (a_id, 1, [2, 2, 5, 5]),  # pedestrian (trailing comma)
        (b_id, 2, [1, 1, 10, 10]),  # people
    ])
    for ann in coco["annotations"]:
        assert ann["area"] == ann["bbox"][2] * ann["bbox"][3]
        assert ann["iscrowd"] == 0
        assert 1 <= ann["category_id"] <= 10
    car = next(a for a in coco["annotations"] if a["category_id"] == 4)
    bus = next(a for a in coco["annotations"] if a["category_id"] == 9)
    assert (car["truncation"], car["occlusion"]) == (0, 1)
    assert (bus["truncation"], bus["occlusion"]) == (1, 0)
    assert len({a["id"] for a in coco["annotations"]}) == 5
    stats = coco["info"]["stats"]
    assert (stats["ignored_regions"], stats["others"], stats["score_zero"]) == (1, 1, 1)
    assert (stats["zero_area"], stats["mostly_painted"], stats["clipped"]) == (1, 1, 2)

    report = validate_coco(out / "val.json")
    assert report.problems == []
    assert report.num_images == 2 and report.num_annotations == 5


def test_ignored_region_is_filled_with_the_image_mean_colour(tmp_path):
    src = _write_split(tmp_path)
    out = tmp_path / "coco"
    convert_visdrone(src, out)
    name = "0000001_00000_d_0000001.jpg"
    before, after = _pixels(src / "images" / name), _pixels(out / "images" / name)
    mean = before.reshape(-1, 3).mean(axis=0)
    assert mean == pytest.approx([100, 0, 100], abs=3)  # half red, half blue
    # region rows top..top+height = 16..48, cols left..left+width = 16..48; JPEG chroma
    # upsampling blends its outermost pixel ring with the neighbours, so look 2 px inside
    inner = after[18:46, 18:46]
    assert np.abs(inner - mean).max() <= 3
    assert np.abs(after[16:48, 16:48].mean(axis=(0, 1)) - mean).max() <= 6
    # outside the region the image is unchanged (up to JPEG noise)
    assert np.abs(after[:, 56:] - before[:, 56:]).max() <= 6
    assert np.abs(after[52:, :8] - before[52:, :8]).max() <= 6
    assert after[5, 5] == pytest.approx([200, 0, 0], abs=6)
    # an image without ignored regions is copied byte for byte
    other = "0000002_00000_d_0000002.jpg"
    assert (out / "images" / other).read_bytes() == (src / "images" / other).read_bytes()


def test_explicit_split_name(tmp_path):
    src = _write_split(tmp_path)
    written = convert_visdrone(src, tmp_path / "coco", split="train")
    assert set(written) == {"train", "images"}
    assert written["train"].name == "train.json" and written["train"].is_file()


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("1,2,3", "height"),
        ("1,2,abc,4,1,1,0,0", "width"),
        ("1,2,3,4,1,12,0,0", "category"),
        ("1,2,3,4,1,1.5,0,0", "category"),
        ("1,2,3,-4,1,1,0,0", "height"),
        ("1,2,3,4,1,nan,0,0", "category"),
        ("1,2,3,4,1,1,0,x", "occlusion"),
        ("1,2,3,4,1,1,0,0,9", "occlusion"),  # a 9th value after occlusion
    ],
)
def test_malformed_line_raises_naming_file_line_and_field(tmp_path, line, field):
    src = _write_split(tmp_path, ["60,5,10,12,1,4,0,1", line])
    out = tmp_path / "coco"
    with pytest.raises(DataError) as info:
        convert_visdrone(src, out)
    message = str(info.value)
    assert "0000001_00000_d_0000001.txt" in message
    assert "line 2" in message
    assert f"'{field}'" in message
    assert "\n" not in message
    assert not out.exists()  # nothing is written when an annotation file is bad


def test_missing_annotation_file_is_a_data_error(tmp_path):
    src = _write_split(tmp_path)
    (src / "annotations" / "0000002_00000_d_0000002.txt").unlink()
    with pytest.raises(DataError, match="0000002_00000_d_0000002"):
        convert_visdrone(src, tmp_path / "coco")


def test_cli_convert(tmp_path, capsys):
    src = _write_split(tmp_path)
    out = tmp_path / "coco"
    assert main(["data", "convert", "visdrone", str(src), str(out)]) == 0
    assert f"val: {out / 'val.json'}" in capsys.readouterr().out
    assert validate_coco(out / "val.json").ok


def test_cli_convert_bad_line_exits_non_zero_without_traceback(tmp_path, capsys):
    src = _write_split(tmp_path, ["1,2,3,4,1,car,0,0"])
    assert main(["data", "convert", "visdrone", str(src), str(tmp_path / "coco")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "line 1" in err and "'category'" in err
    assert len(err.strip().splitlines()) == 1

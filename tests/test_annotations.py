"""Compact annotations: the same targets as the JSON says, cached once, memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdsweep.data import annotations as ann_mod
from kdsweep.data.coco import DataError
from kdsweep.data.annotations import cache_dir, clipped_xyxy, ensure_compact, load_compact


def _coco(n_images: int = 30, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in rng.permutation(n_images):  # out of id order on purpose
        w, h = (640, 480) if i % 2 else (480, 640)
        images.append({"id": int(i) * 3 + 1, "file_name": f"img_{i}.jpg", "width": w, "height": h})
    aid = 1
    for im in images:
        for _ in range(int(rng.integers(0, 5))):
            x, y = rng.uniform(-5, im["width"]), rng.uniform(-5, im["height"])
            anns.append({"id": aid, "image_id": im["id"], "category_id": int(rng.choice([5, 2, 9])),
                         "bbox": [x, y, rng.uniform(0.001, 200), rng.uniform(0.001, 200)],
                         "iscrowd": int(rng.random() < 0.1), "segmentation": [[0, 0, 1, 1, 2, 2]]})
            aid += 1
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in (9, 2, 5)]}


def _expected(data: dict) -> dict[int, tuple[list, list]]:
    """Per image id: the targets as a plain reading of the JSON gives them (crowd and slivers out)."""
    cats = sorted(c["id"] for c in data["categories"])
    out = {im["id"]: ([], []) for im in data["images"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    for a in data["annotations"]:
        box = None if a.get("iscrowd") else clipped_xyxy(a["bbox"], *sizes[a["image_id"]])
        if box is not None:
            out[a["image_id"]][0].append(box)
            out[a["image_id"]][1].append(cats.index(a["category_id"]) + 1)
    return out


def test_compact_targets_equal_the_json_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    data = _coco()
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    compact = load_compact(path)
    expected = _expected(data)
    assert list(compact.image_ids) == sorted(expected)  # id order
    assert compact.category_ids == (2, 5, 9) and compact.category_names == ("c2", "c5", "c9")
    by_id = {im["id"]: im for im in data["images"]}
    for i, image_id in enumerate(compact.image_ids):
        boxes, labels = compact.targets(i)
        want_boxes, want_labels = expected[int(image_id)]
        assert boxes.dtype == np.float32 and labels.dtype == np.int64 and boxes.shape == (len(want_labels), 4)
        np.testing.assert_array_equal(boxes, np.array(want_boxes, dtype=np.float32).reshape(-1, 4))
        assert labels.tolist() == want_labels
        assert compact.file_name(i) == by_id[int(image_id)]["file_name"]
        assert tuple(compact.sizes[i]) == (by_id[int(image_id)]["width"], by_id[int(image_id)]["height"])
    assert compact.boxes.shape[0] < len(data["annotations"])  # crowd boxes and slivers were left out


def test_the_cache_is_written_once_memory_mapped_and_renewed_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_coco()))
    folder = ensure_compact(path)
    assert (folder / "boxes.npy").is_file() and folder == cache_dir(path)
    calls = []
    real = ann_mod.convert
    monkeypatch.setattr(ann_mod, "convert", lambda *a: calls.append(1) or real(*a))
    compact = load_compact(path)
    assert calls == [] and isinstance(compact.boxes, np.memmap)  # read from the cache, not converted
    path.write_text(json.dumps(_coco(12, seed=1)))  # a new version of the file: a new key
    assert len(load_compact(path)) == 12 and calls == [1]


def test_non_integer_image_ids_are_refused_naming_the_file(tmp_path):
    data = _coco(3)
    data["images"][0]["id"] = "abc"
    for a in data["annotations"]:
        a["image_id"] = "abc" if a["image_id"] == data["images"][0]["id"] else a["image_id"]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"train\.json: image id 'abc' is not an integer"):
        load_compact(path, use_cache=False)


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-9])  # the header stays, the data is short: np.load's mmap fails


def _drop_last_box(file: Path) -> None:
    """A well-formed .npy one row shorter than the others say (e.g. an array of another version)."""
    np.save(file, np.load(file)[:-1])


@pytest.mark.parametrize("name, damage", [("boxes", _truncate), ("labels", Path.unlink), ("name_ends", _truncate),
                                          ("boxes", _drop_last_box), ("meta.json", lambda f: f.write_text("{"))])
def test_a_damaged_cache_file_is_rebuilt_to_what_a_fresh_build_gives(tmp_path, monkeypatch, name, damage):
    """Issue 24: the cache was trusted when meta.json existed; a truncated or missing array gave
    "mmap length is greater than file size" (no path) in a worker. Every file is checked now, and a
    damaged folder is rebuilt from the JSON, equal to a conversion without cache."""
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_coco()))
    folder = ensure_compact(path)
    file = folder / (name if name.endswith(".json") else f"{name}.npy")
    damage(file)
    assert ensure_compact(path) == folder
    compact, fresh = load_compact(path), load_compact(path, use_cache=False)
    for array in ann_mod.ARRAYS:
        np.testing.assert_array_equal(getattr(compact, array), getattr(fresh, array))
    assert (compact.category_ids, compact.category_names) == (fresh.category_ids, fresh.category_names)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the broken copy is gone


def test_a_cache_broken_after_its_check_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(_coco()))
    folder = ensure_compact(path)
    # broken between its (re)build and the read: the one window left (a copy found intact is read once)
    monkeypatch.setattr(ann_mod, "_ensure", lambda p: (_truncate(folder / "boxes.npy"), (folder, None))[1])
    with pytest.raises(DataError, match=r"train\.json: its compact cache is broken \(.*boxes\.npy: unreadable.*delete "):
        load_compact(path)

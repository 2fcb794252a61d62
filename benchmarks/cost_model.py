"""GPU-hours and wall time of each ``paper`` ablation: a cost model, shown, not a measurement.

No GPU was available to this project's CPU machine, so the table of ``docs/cluster.md`` comes from
this model. Every input is printed with where it comes from:

* **FLOPs** of every row's student (forward + backward = 3 forwards) and teacher (forward), counted
  by ``torch.utils.flop_counter`` on the ``meta`` device at the row's input size (COCO's 640x480
  resized to 800/1333: 800x1067, padded to 800x1088). Backbone, FPN and dense head; the KD terms,
  adapters and the two-stage detectors' ROI MLPs are left out (a few percent).
* **Device speed**: ``--ref-images-per-s``, the training images/s of one A100 on the R50 RetinaNet
  student alone under AMP. An assumption (16: twice a V100's fp32 rate of ~8 img/s in
  mmdetection's RetinaNet R50 1x training); ``--gpu-check gpu_check.json`` replaces it with the
  paper step that ``benchmarks/gpu_check.py`` measured on a GPU. Every other model's time
  scales with its FLOPs.
* **Padding** (``benchmarks/bench_loader.py``, measured): 14.9 % of the pixels of plain batches of
  2 after padding to /32, 1.9 % with aspect-ratio grouping.
* **Decoding on the training thread** (before): ``--decode-ms`` per image (bench_loader's old
  loader on this machine's CPU), added to every step; after: 0, 3 loader processes per GPU.
* **Evaluation**: 5,000 val images predicted on the trial's GPUs at the training rate's forward
  share, then COCOeval on rank 0 while every GPU of the trial waits (``benchmarks/bench_eval.py``
  on this CPU, 5,000 images x 100 detections: pycocotools 52 s before, faster-coco-eval 6.3 s
  after). Before: every epoch; after: the last epoch.
* **Schedule**: each row's and teacher's epochs of the paper preset (12, the baselines' 2x: 24) of COCO train2017 (118,287 images) at 16 images per step on 8 GPUs;
  each distinct teacher (its model at its own resolution) trains first, then the rows; before, one trial at a time
  (``max_concurrent_trials=1``); after, ``auto``: GPUs / 8 trials at once.

"Useful share" is the time the GPUs spend on the unpadded images' FLOPs, over the trial's
time.

What the model leaves out (each makes a real run slower than the model, except the first):

* kdsweep's own host syncs per step (7 before, 1 after): not charged before either;
* the detector's own host syncs, dozens per step: torchvision's anchor matching and its
  per-image loss loops (RetinaNet, FCOS), the ROI sampling of Faster R-CNN; their cost is kernel
  launch latency and idle GPU time that only a GPU can show;
* the KD terms, adapters, assistants and ROI heads (a few percent of the FLOPs; CSA's attention
  more at P3);
* gradient all-reduce across nodes (NCCL over the cluster's network), data reads from shared
  storage, checkpoints, trial start-up (placement, model build) and restarts after failures.

The result is an estimate until ``--gpu-check`` calibrates it with a measured step, and even
then only for the GPU that measured it (the JSON names it). ``--ref-images-per-s 10`` and ``16``
bracket a plausible range for the assumption.

::

    python benchmarks/cost_model.py [--ref-images-per-s 16] [--gpu-check gpu_check.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdsweep.config import ModelConfig, student_model, teacher_model, to_dict
from kdsweep.models.detectors import build_detector
from kdsweep.orchestrate.launch import add_arguments, prepare

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ("ablation_ssim", "ablation_scalekd", "ablation_mimic", "ablation_mimicdet", "ablation_baselines")
TRAIN_IMAGES, VAL_IMAGES, EPOCHS, GPUS_PER_TRIAL = 118_287, 5_000, 12, 8
IMAGE = (480, 640)  # (h, w) of a COCO image (landscape; the portrait one costs the same)
PAD_BEFORE, PAD_AFTER = 0.149, 0.019  # bench_loader: share of padded pixels, plain / grouped


def input_size(cfg: ModelConfig, scale: float = 1.0) -> tuple[int, int]:
    """``(h, w)`` of IMAGE after torchvision's resize (``min_size``/``max_size``) times ``scale``."""
    h, w = IMAGE
    r = min(cfg.min_size / min(h, w), cfg.max_size / max(h, w)) * scale
    return round(h * r), round(w * r)


_cache: dict[tuple, float] = {}


def forward_flops(cfg: ModelConfig, size: tuple[int, int]) -> float:
    """FLOPs of one image through backbone + FPN + head at ``size`` (padded to /32), on ``meta``."""
    h, w = (math.ceil(s / 32) * 32 for s in size)
    key = (cfg.arch, cfg.backbone, cfg.fpn_channels, cfg.upsample, h, w)
    if key not in _cache:
        with torch.device("meta"):
            model = build_detector(dataclasses.replace(cfg, weights=None), 80)
            with FlopCounterMode(display=False) as counter:
                features = model.backbone(torch.zeros(1, 3, h, w))
                if hasattr(model, "head"):
                    model.head(list(features.values()))
                elif hasattr(model, "rpn"):
                    model.rpn.head(list(features.values()))
        _cache[key] = float(counter.get_total_flops())
    return _cache[key]


@dataclass
class Row:
    label: str
    train_flops: float  # per image, unpadded: 3 x student forward (+ teacher forward)
    eval_flops: float  # per image: the student's forward
    teacher: bool
    epochs: int = EPOCHS  # of COCO train2017 (the baselines' paper setting: 24, their 2x schedule)


def rows_of(space: str) -> tuple[list[Row], list[Row]]:
    """The rows of ``search_spaces/<space>.yaml`` under the paper preset, and the run of each
    distinct teacher (each at its own resolution: ScaleKD's 2x teacher is a teacher of its own)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("space")
    add_arguments(parser)
    prepared = prepare(parser.parse_args([str(ROOT / "search_spaces" / f"{space}.yaml"), "--preset", "paper"]), with_data=False)
    out = []
    for label, exp in prepared.rows.items():
        model = student_model(exp)  # at its resolution
        student = forward_flops(model, input_size(model))
        teacher = forward_flops(teacher_model(exp), input_size(teacher_model(exp))) if exp.kd else 0.0
        out.append(Row(label, 3 * student + teacher, student, bool(exp.kd), exp.train.epochs))
    teachers = {}
    for exp in prepared.rows.values():
        if exp.kd:
            model = teacher_model(exp)
            teachers.setdefault(json.dumps(to_dict(model), sort_keys=True), (model, exp.teacher_train.epochs))
    flops = [forward_flops(m, input_size(m)) for m, _ in teachers.values()]
    return out, [Row(f"teacher {m.min_size}", 3 * t, t, False, epochs) for (m, epochs), t in zip(teachers.values(), flops)]


def trial_hours(row: Row, flops_per_s: float, *, before: bool, decode_ms: float, cocoeval_s: tuple[float, float]) -> float:
    """Wall hours of one 8-GPU trial of ``row``."""
    pad = PAD_BEFORE if before else PAD_AFTER
    per_image = row.train_flops / (1 - pad) / flops_per_s  # GPU seconds per image
    step = 2 * per_image + (2 * decode_ms / 1000 if before else 0.0)  # 2 images per GPU per step
    steps = TRAIN_IMAGES // (2 * GPUS_PER_TRIAL)
    evals = row.epochs if before else 1
    predict = VAL_IMAGES / GPUS_PER_TRIAL * row.eval_flops / (1 - pad) / flops_per_s  # forward only, at the training efficiency
    return (row.epochs * steps * step + evals * (predict + cocoeval_s[0 if before else 1])) / 3600


def waves(hours: list[float], at_once: int) -> float:
    """Wall hours of trials run ``at_once`` at a time, longest first: each wave lasts as long as its longest."""
    ordered = sorted(hours, reverse=True)
    return sum(ordered[i] for i in range(0, len(ordered), at_once))


def device_speed(ref: float, ref_images_per_s: float, gpu_check: str | None, r50: ModelConfig,
                 coco: tuple[int, int]) -> tuple[float, str]:
    """Effective FLOP/s of one GPU and where the figure comes from: the assumption
    (``ref_images_per_s`` of the R50 student, forward + backward = 3 forwards ``ref``), or the
    ``paper_step`` of a GPU run of ``gpu_check.py`` (R50 student + R101 teacher forward, 2 images
    per step), named by its GPU. A CPU or ``--quick`` JSON is refused (SystemExit, one line)."""
    if not gpu_check:
        return 3 * ref * ref_images_per_s, (f"ESTIMATE: assumed {ref_images_per_s:g} img/s per A100 for the R50 student "
                                            "alone, no GPU measured it (--ref-images-per-s 10 and 16 bracket it)")
    check = json.loads(Path(gpu_check).read_text())
    if check.get("quick") or check.get("device") == "cpu":
        raise SystemExit(f"cost_model: {gpu_check} is a CPU or --quick run of gpu_check; give the JSON of a GPU run")
    step = check["sections"]["paper_step"]["paper_loader"]
    r101 = forward_flops(dataclasses.replace(r50, backbone="resnet101"), coco)
    return (3 * ref + r101) * 2 / (step["ms_per_step"] / 1000), (
        f"measured on {check.get('device', 'an unnamed GPU')}: gpu_check paper_step {step['ms_per_step']} ms per step "
        "of 2 images; the figures hold for that GPU")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref-images-per-s", type=float, default=16.0,
                        help="training images/s of one A100 on the R50 RetinaNet student alone under AMP (assumed: 16)")
    parser.add_argument("--gpu-check", help="gpu_check.json of a GPU run: its paper_step (SSIM row, R50 <- R101) calibrates the speed")
    parser.add_argument("--decode-ms", type=float, default=4.1, help="ms per image of the old in-process decode (bench_loader: 4.1)")
    parser.add_argument("--cocoeval-s", type=float, nargs=2, default=(52.0, 6.3), metavar=("BEFORE", "AFTER"),
                        help="COCOeval seconds on 5,000 images: pycocotools, faster-coco-eval (bench_eval: 52, 6.3)")
    parser.add_argument("--gpus", default="8,32,64", help="cluster sizes of the wall-time columns")
    args = parser.parse_args(argv)

    r50 = ModelConfig(arch="retinanet", backbone="resnet50", fpn_channels=256, min_size=800, max_size=1333)
    coco = input_size(r50)
    ref = forward_flops(r50, coco)
    flops_per_s, source = device_speed(ref, args.ref_images_per_s, args.gpu_check, r50, coco)
    print(f"device speed: {flops_per_s / 1e12:.1f} effective TFLOP/s per GPU ({source}); R50 RetinaNet forward "
          f"{ref / 1e9:.0f} GFLOPs at {coco}")
    print(f"padding {PAD_BEFORE:.1%} -> {PAD_AFTER:.1%}; decode {args.decode_ms} ms/img on the training thread -> loader processes; "
          f"COCOeval {args.cocoeval_s[0]:.0f} s x {EPOCHS} epochs -> {args.cocoeval_s[1]:.1f} s x 1\n")
    sizes = [int(g) for g in args.gpus.split(",")]
    header = ["ablation", "trials", "GPU-h before", "GPU-h after", "useful share before / after"] + [f"wall {g} GPUs before" for g in sizes[:1]] + \
        [f"wall {g} GPUs after" for g in sizes]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    totals = [0.0, 0.0]
    for space in ABLATIONS:
        rows, teachers = rows_of(space)
        trained = rows + teachers
        # GPU-hours on the unpadded images' FLOPs alone: the share of the total that is useful work
        useful_gpu_h = sum(r.epochs * (TRAIN_IMAGES // 16) * 16 * r.train_flops / flops_per_s / 3600 for r in trained)
        out = []
        for before in (True, False):
            hours = [trial_hours(r, flops_per_s, before=before, decode_ms=args.decode_ms, cocoeval_s=args.cocoeval_s) for r in rows]
            t = [trial_hours(r, flops_per_s, before=before, decode_ms=args.decode_ms, cocoeval_s=args.cocoeval_s)
                 for r in teachers]
            gpu_h = GPUS_PER_TRIAL * (sum(hours) + sum(t))
            walls = {}
            for g in sizes:
                at_once = 1 if before else max(1, g // GPUS_PER_TRIAL)
                walls[g] = waves(t, at_once) + waves(hours, at_once)  # the teachers first, then the rows
            out.append((gpu_h, walls, useful_gpu_h / gpu_h))
        totals[0] += out[0][0]
        totals[1] += out[1][0]
        trials = len(trained)
        cells = [space, str(trials), f"{out[0][0]:.0f}", f"{out[1][0]:.0f}", f"{out[0][2]:.0%} / {out[1][2]:.0%}",
                 f"{out[0][1][sizes[0]]:.1f} h"] + \
            [f"{out[1][1][g]:.1f} h" for g in sizes]
        print("| " + " | ".join(cells) + " |")
    print(f"\nall {len(ABLATIONS)}: {totals[0]:.0f} -> {totals[1]:.0f} GPU-hours ({totals[1] / totals[0]:.0%})")


if __name__ == "__main__":
    main()

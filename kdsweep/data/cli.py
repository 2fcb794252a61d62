"""``kdsweep data synth|check|convert``: each returns an exit code, never a traceback for bad data.

The data modules are imported inside each command, deliberately: they bring torch and PIL, and
``kdsweep --help`` builds this parser (see :mod:`kdsweep.cli`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _synth(args: argparse.Namespace) -> int:
    from kdsweep.data.synthetic import generate

    # the same limits as generate(), which raises ValueError on anything else
    if min(args.train, args.val) < 0 or args.size < 64 or args.seed < 0:
        print("kdsweep data synth: --train/--val must be >= 0, --size >= 64 and --seed >= 0", file=sys.stderr)
        return 2
    try:
        written = generate(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed, progress=True,
                           style=args.style)
    except FileExistsError as exc:
        print(f"kdsweep data {exc}", file=sys.stderr)
        return 1
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from kdsweep.data.coco import validate_coco
    from kdsweep.data.image_check import printer

    ann = Path(args.annotations)
    report = validate_coco(ann, args.images, decode=not args.headers_only, progress=printer(f"checking {ann.name}"))
    print(f"{ann}: {report.num_images} images, {report.num_annotations} annotations")
    if report.class_counts:
        print("per class: " + ", ".join(f"{k} {v}" for k, v in sorted(report.class_counts.items())))
    total = sum(report.size_counts.values()) or 1
    print("by size:   " + ", ".join(f"{k} {v} ({100 * v / total:.0f}%)" for k, v in report.size_counts.items()))
    for line in report.problems:
        print(line, file=sys.stderr)
    if report.problems:
        print(f"{report.num_problems} problem(s) found", file=sys.stderr)
        return 1
    print("ok")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from kdsweep.data.coco import DataError
    from kdsweep.data.visdrone import convert_visdrone

    src = Path(args.src)
    if not (src / "annotations").is_dir() or not (src / "images").is_dir():
        print(f"kdsweep data convert: {src} needs annotations/ and images/ (VisDrone-DET layout)", file=sys.stderr)
        return 2
    try:
        written = convert_visdrone(src, args.out)
    except DataError as exc:
        print(f"kdsweep data convert: {exc}", file=sys.stderr)
        return 1
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its subcommands to the ``kdsweep`` parser."""
    data = subparsers.add_parser("data", help="generate, check or convert detection datasets")
    sub = data.add_subparsers(dest="data_command", required=True)
    synth = sub.add_parser("synth", help="write a synthetic small-object detection dataset (COCO format)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--train", type=int, default=600, help="training images (default 600)")
    synth.add_argument("--val", type=int, default=150, help="validation images (default 150)")
    synth.add_argument("--size", type=int, default=192, help="image side in pixels (default 192)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--style", choices=["cluttered", "simple"], default="cluttered",
                       help="cluttered (VisDrone-like, default) or simple (no distractors or occluders)")
    synth.set_defaults(func=_synth)
    check = sub.add_parser("check", help="validate a COCO instances file and its images")
    check.add_argument("annotations", help="COCO instances JSON")
    check.add_argument("--images", help="image folder (default: images/ beside the JSON)")
    check.add_argument("--headers-only", action="store_true",
                       help="read each image's header (size) instead of decoding it in full, as a launch does: "
                            "much faster, misses truncated files")
    check.set_defaults(func=_check)
    convert = sub.add_parser("convert", help="convert another format to COCO")
    convert.add_argument("format", choices=["visdrone"])
    convert.add_argument("src", help="VisDrone-DET split folder (annotations/, images/)")
    convert.add_argument("out", help="output folder")
    convert.set_defaults(func=_convert)

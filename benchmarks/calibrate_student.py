"""Train one detector on the embedded synthetic data without Ray and print COCO AP per epoch.

Used to choose preset settings (optimiser, learning rate, resolution, schedule length): what AP
a from-scratch detector reaches on 2 CPU cores in a given number of epochs. Example::

    python benchmarks/calibrate_student.py --arch retinanet --size 128 --epochs 20 --lr 0.002
"""

from __future__ import annotations

import argparse
import time

import torch

from kdsweep.config import DataConfig, ModelConfig, TrainConfig
from kdsweep.data.coco import resolve_data
from kdsweep.data.dataset import CocoDetection, collate
from kdsweep.models.detectors import build_detector
from kdsweep.train.distiller import Distiller
from kdsweep.train.engine import evaluate, train_one_epoch
from kdsweep.train.optim import Optimization, make_optimizer, warmup_cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="retinanet", choices=["retinanet", "fcos", "fasterrcnn"])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--fpn", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--anchor-scale", type=float, default=2.0)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--style", default="cluttered", choices=["cluttered", "simple"])
    parser.add_argument("--head-norm", action="store_true", help="GroupNorm in RetinaNet's head (ModelConfig.head_norm)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    paths = resolve_data(DataConfig(synth_train=args.train, synth_val=args.val, synth_size=args.size,
                                   synth_style=args.style))
    train_ds = CocoDetection(paths.train_ann, paths.train_images)
    val_ds = CocoDetection(paths.val_ann, paths.val_images)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=8, collate_fn=collate)
    model_cfg = ModelConfig(arch=args.arch, backbone=args.backbone, fpn_channels=args.fpn, min_size=args.size,
                            max_size=args.size, anchor_scale=args.anchor_scale, head_norm=args.head_norm)
    distiller = Distiller(build_detector(model_cfg, train_ds.num_classes))
    params = [p for p in distiller.trainable.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, TrainConfig(optimizer=args.optimizer, lr=args.lr))
    total = len(train_loader) * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, 30, args.schedule))
    optimization = Optimization(optimizer, scheduler, params, grad_clip=10.0)
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        out = train_one_epoch(distiller, optimization, train_loader, device=torch.device("cpu"), epoch=epoch)
        stats = evaluate(distiller.student, val_loader, device=torch.device("cpu"), coco_gt=val_ds.coco_gt,
                         label_to_cat_id=val_ds.label_to_cat_id, image_ids=val_ds.image_ids)
        cells = " ".join(f"{k} {stats[k]:.1f}" for k in ("AP", "AP50", "AP_S", "AP_M", "AP_L"))
        print(f"epoch {epoch:2d}  {time.time() - start:6.0f} s  loss {out['loss']:.3f}  {cells}", flush=True)


if __name__ == "__main__":
    main()

"""Ray Train worker loop: checkpoint round trip, resume, and a real 2-worker DDP run whose
evaluation covers the whole val set (gathered across workers)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from kdsweep.config import ExperimentConfig, ModelConfig, TrainConfig, from_dict, teacher_experiment
from kdsweep.models.detectors import build_detector
from kdsweep.names import REPLAYED
from kdsweep.train.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint
from kdsweep.train.distiller import Distiller
from kdsweep.train.optim import Optimization, make_optimizer

TINY = {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 16, "min_size": 64, "max_size": 64, "anchor_scale": 2.0}


def _distiller(seed: int) -> Distiller:
    torch.manual_seed(seed)
    return Distiller(build_detector(ModelConfig(**TINY), 3))


def _step(distiller: Distiller, optimizer, scheduler) -> None:
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}]
    loss = sum(distiller(images, targets).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def _optimization(distiller: Distiller) -> Optimization:
    optimizer = make_optimizer(list(distiller.trainable.parameters()), TrainConfig(optimizer="adamw", lr=1e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 / (i + 1))
    return Optimization(optimizer, scheduler, list(distiller.trainable.parameters()))


def test_checkpoint_round_trip_restores_model_optimizer_scheduler_epoch(tmp_path):
    torch.set_num_threads(1)
    a = _distiller(0)
    opt_a = _optimization(a)
    _step(a, opt_a.optimizer, opt_a.scheduler)
    save_checkpoint(str(tmp_path), a, opt_a, epoch=3)

    b = _distiller(1)
    opt_b = _optimization(b)
    assert load_checkpoint(str(tmp_path), b, opt_b) == 4
    for (name, pa), pb in zip(a.trainable.state_dict().items(), b.trainable.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert opt_b.scheduler.last_epoch == opt_a.scheduler.last_epoch
    state_a, state_b = opt_a.optimizer.state_dict()["state"], opt_b.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k]["exp_avg"], state_b[k]["exp_avg"]) for k in state_a)
    # model.pt is plain detector weights, loadable as a teacher checkpoint
    teacher = build_detector(ModelConfig(**TINY, weights=str(tmp_path / MODEL_FILE)), 3)
    for pa, pt in zip(a.student.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(pa, pt)
    # training continues identically after the resume
    _step(a, opt_a.optimizer, opt_a.scheduler)
    _step(b, opt_b.optimizer, opt_b.scheduler)
    for pa, pb in zip(a.trainable.parameters(), b.trainable.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


@pytest.mark.slow
def test_two_worker_ray_train_run_evaluates_whole_val_set_and_resumes(tmp_path, monkeypatch):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kdsweep.data.coco import resolve_data
    from kdsweep.train.worker import train_fn_per_worker

    monkeypatch.setenv("KDSWEEP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("KDSWEEP_CHECK_COLLECTIVES", "1")  # workers inherit it: a host tensor in a collective fails
    exp = from_dict(
        ExperimentConfig,
        {
            "data": {"synth_train": 16, "synth_val": 7, "synth_size": 64},
            "teacher": TINY,
            "student": TINY,
            # the backbone frozen for the first step of epoch 1 and thawed at its second: Ray's
            # prepare_model wraps DDP again at each change (Optimization.begin -> Distiller.rewrap)
            "teacher_train": {"epochs": 1, "batch_size": 4, "optimizer": "adamw", "lr": 1e-3, "warmup_iters": 1,
                              "num_workers": 2, "threads_per_worker": 1, "cpus_per_worker": 0.5, "freeze_backbone": 0.5},
        },
    )
    paths = resolve_data(exp.data)
    data = paths.strings()
    reports = tmp_path / "reports.jsonl"

    class Record(ray.train.UserCallback):
        """Each report's rank-0 metrics as one JSON line (the callback runs in Train's controller)."""

        def after_report(self, run_context, metrics, checkpoint):
            with open(reports, "a") as f:
                f.write(json.dumps({k: v for k, v in metrics[0].items() if k in ("epoch", REPLAYED)}) + "\n")

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        def fit(epochs: int):
            run = teacher_experiment(exp)
            run = dataclasses.replace(run, train=dataclasses.replace(run.train, epochs=epochs))
            config = {"experiment": run, "data": data, "teacher_state": None, "label": "t"}
            trainer = TorchTrainer(
                train_fn_per_worker,
                train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                run_config=RunConfig(name="resume-me", storage_path=str(tmp_path / "ray"), callbacks=[Record()]),
            )
            return trainer.fit()

        first = fit(1)
        assert first.error is None
        assert first.metrics["eval_images"] == 7  # 7 val images split 4/3 over two workers
        assert first.metrics["epoch"] == 1 and first.metrics["start_epoch"] == 1
        # the same (storage_path, name) comes back: the run resumes at epoch 2, not 1
        second = fit(2)
        assert second.error is None
        assert second.metrics["epoch"] == 2
        assert second.metrics["start_epoch"] == 2  # epoch 1 came from the checkpoint, not retrained
        # the resumed run first reports its checkpoint's epoch again, flagged, for a launcher that
        # was stopped before that report reached it (MLflow logs it only where it is missing)
        assert [json.loads(line) for line in reports.read_text().splitlines()] == [
            {"epoch": 1}, {"epoch": 1, REPLAYED: 1}, {"epoch": 2}]
        assert os.path.exists(os.path.join(second.checkpoint.path, MODEL_FILE))
    finally:
        ray.shutdown()


def test_resuming_a_kd_run_restores_the_adapters_the_assistant_and_its_own_optimizer(tmp_path):
    """A KD run (an l2 term with adapters, ScaleKD's assistant with its own Adam) saved after two
    steps and loaded into a fresh build continues exactly as the uninterrupted run."""
    from kdsweep.config import KDTermConfig
    from kdsweep.train.distiller import build_distiller
    from kdsweep.train.engine import train_one_epoch
    from kdsweep.train.optim import build_optimization

    def build(seed: int):
        torch.manual_seed(1)
        teacher = build_detector(ModelConfig(**{**TINY, "fpn_channels": 32}), 3)
        torch.manual_seed(seed)
        kd = (KDTermConfig("l2", adapter=True), KDTermConfig("csa", params={"num_heads": 2, "ratios": [1, 2]}))
        distiller = build_distiller(ExperimentConfig(student=ModelConfig(**TINY), kd=kd), 3, teacher)
        cfg = TrainConfig(optimizer="adamw", lr=1e-3, epochs=2, warmup_iters=1)
        return distiller, build_optimization(distiller.trainable, distiller.student, cfg, torch.device("cpu"), 2)

    batch = ([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))],
             [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}])
    run = lambda d, o, epoch: train_one_epoch(d, o, [batch, batch], device=torch.device("cpu"), epoch=epoch,  # noqa: E731
                                              step_offset=2 * (epoch - 1), total_steps=4)
    a, opt_a = build(0)
    run(a, opt_a, 1)
    save_checkpoint(str(tmp_path), a, opt_a, epoch=1)
    b, opt_b = build(7)  # other initial weights: everything must come from the checkpoint
    assert load_checkpoint(str(tmp_path), b, opt_b) == 2
    for (name, pa), pb in zip(a.trainable.state_dict().items(), b.trainable.state_dict().values()):
        assert torch.equal(pa, pb), name  # the student, the adapters and the assistant
    [(own_a, _)], [(own_b, _)] = opt_a.term_optimizers, opt_b.term_optimizers
    state_a, state_b = own_a.state_dict()["state"], own_b.state_dict()["state"]
    assert state_a and all(torch.equal(state_a[k]["exp_avg_sq"], state_b[k]["exp_avg_sq"]) for k in state_a)
    run(a, opt_a, 2)
    run(b, opt_b, 2)
    for pa, pb in zip(a.trainable.parameters(), b.trainable.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize(("epochs", "every", "expected"), [(4, 1, [1, 2, 3, 4]), (5, 2, [2, 4, 5]), (12, 0, [12]), (3, 7, [3])])
def test_evaluated_epochs_follow_eval_every_and_always_include_the_last(epochs, every, expected):
    from kdsweep.train.worker import evaluates

    cfg = TrainConfig(epochs=epochs, eval_every=every)
    assert [e for e in range(1, epochs + 1) if evaluates(e, cfg)] == expected

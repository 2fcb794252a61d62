"""Training engine: non-finite losses stop the run, the LR schedule, a real epoch learns."""

import pytest
import torch

from kdsweep.train.engine import NonFiniteLossError, check_finite, train_one_epoch
from kdsweep.train.optim import Optimization, warmup_cosine


def test_non_finite_loss_raises_with_reason():
    losses = {"classification": torch.tensor(float("nan")), "kd_ssim": torch.tensor(0.3)}
    with pytest.raises(NonFiniteLossError, match=r"epoch 2 step 5 .*classification=nan"):
        check_finite(sum(losses.values()), losses, epoch=2, step=5)
    check_finite(torch.tensor(1.0), {"a": torch.tensor(1.0)}, epoch=1, step=0)  # finite: no error


def test_warmup_then_cosine_to_zero_and_step_schedule():
    f = warmup_cosine(total_iters=110, warmup_iters=10, schedule="cosine")
    assert f(0) == pytest.approx(0.001)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(110) == pytest.approx(0.0, abs=1e-9)
    g = warmup_cosine(total_iters=90, warmup_iters=0, schedule="step")
    assert (g(0), g(61), g(89)) == (1.0, 0.1, 0.01)


def _sgd(model: torch.nn.Module) -> Optimization:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Optimization(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0), list(model.parameters()))


class _Toy(torch.nn.Module):
    """A 'detector' whose loss is the squared distance of a parameter to the box mean."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images, targets, progress=0.0):
        goal = torch.stack([t["boxes"].mean() for t in targets]).mean()
        return {"mse": (self.w - goal) ** 2}


def test_train_one_epoch_reduces_the_loss_and_reports_means():
    model = _Toy()
    batch = ([torch.zeros(3, 4, 4)], [{"boxes": torch.full((1, 4), 2.0)}])
    loader = [batch] * 20
    out = train_one_epoch(model, _sgd(model), loader, device=torch.device("cpu"), epoch=1)
    assert model.w.item() == pytest.approx(2.0, abs=0.1)
    assert out["loss"] == pytest.approx(out["loss/mse"]) and out["loss"] > 0
    assert out["train_images_per_s"] > 0


def test_train_one_epoch_stops_on_nan():
    model = _Toy()
    loader = [([torch.zeros(3, 4, 4)], [{"boxes": torch.full((1, 4), float("nan"))}])]
    with pytest.raises(NonFiniteLossError):
        train_one_epoch(model, _sgd(model), loader, device=torch.device("cpu"), epoch=1)
    assert model.w.item() == 0.0  # no step was taken on garbage


def test_out_of_memory_becomes_a_one_line_trial_reason():
    from kdsweep.train.engine import TrialOutOfMemoryError
    from kdsweep.report.tracking import summarize_error

    class _Hungry(_Toy):
        def forward(self, images, targets, progress=0.0):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    model = _Hungry()
    loader = [([torch.zeros(3, 4, 4)] * 2, [{"boxes": torch.ones(1, 4)}] * 2)]
    with pytest.raises(TrialOutOfMemoryError) as info:
        train_one_epoch(model, _sgd(model), loader, device=torch.device("cpu"), epoch=3)
    message = str(info.value)
    assert message == ("out of memory at epoch 3 step 0 (2 images per worker); lower train.batch_size or the "
                       "input size, or use a larger device")
    assert model.w.item() == 0.0
    # what the MLflow failure-reason tag keeps of the worker's traceback
    text = f"Traceback (most recent call last):\n  File x\nkdsweep.train.engine.TrialOutOfMemoryError: {message}\n"
    assert summarize_error(text) == f"kdsweep.train.engine.TrialOutOfMemoryError: {message}"


class _LinearDetector(torch.nn.Module):
    """Eval-mode 'detector': one box per image from a linear layer (so autocast changes its dtype),
    recording whether autocast was on and in which dtype."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 5)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([0.0, 0.0, 4.0, 4.0, 0.9]))
        self.autocast: list[tuple[bool, torch.dtype]] = []
        self.outputs: list[dict[str, torch.Tensor]] = []

    def forward(self, images):
        self.autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        out = self.head(torch.stack([img.mean((1, 2)) for img in images]))
        self.outputs = [{"boxes": o[None, :4], "scores": o[4:], "labels": torch.ones(1, dtype=torch.int64)}
                        for o in out]
        return self.outputs


def _val(n: int):
    return [([torch.zeros(3, 8, 8)], [{"image_id": torch.tensor(i)}]) for i in range(1, n + 1)]


def test_predict_without_amp_returns_the_model_outputs_untouched():
    from kdsweep.train.engine import predict

    model = _LinearDetector()
    (image_id, out), = predict(model, _val(1), torch.device("cpu"))
    assert image_id == 1 and model.autocast == [(False, model.autocast[0][1])]
    assert all(out[k] is model.outputs[0][k] for k in ("boxes", "scores", "labels"))  # no copy, no cast
    assert out["boxes"].dtype == torch.float32


def test_predict_under_amp_autocasts_and_returns_float32_boxes_and_scores():
    from kdsweep.train.engine import predict

    model = _LinearDetector()
    (_, out), = predict(model, _val(1), torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert model.autocast == [(True, torch.bfloat16)]
    assert model.outputs[0]["boxes"].dtype == torch.bfloat16  # what the autocast forward gave
    assert out["boxes"].dtype == torch.float32 and out["scores"].dtype == torch.float32
    assert out["labels"].dtype == torch.int64
    assert torch.equal(out["boxes"], model.outputs[0]["boxes"].float())
    assert out["scores"].item() == pytest.approx(0.9, abs=4e-3)  # 0.9 rounded to bfloat16 (8 bits)


def test_evaluate_passes_amp_dtype_to_the_forward():
    from pycocotools.coco import COCO

    from kdsweep.train.engine import evaluate

    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "width": 8, "height": 8, "file_name": f"{i}.jpg"} for i in (1, 2)],
        "annotations": [{"id": i, "image_id": i, "category_id": 5, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0}
                        for i in (1, 2)],
        "categories": [{"id": 5, "name": "a"}],
    }
    gt.createIndex()
    model = _LinearDetector()
    stats = evaluate(model, _val(2), device=torch.device("cpu"), coco_gt=gt, label_to_cat_id={1: 5}, image_ids=[1, 2],
                     amp_dtype=torch.bfloat16)
    assert model.autocast == [(True, torch.bfloat16)] * 2
    assert stats["AP"] == pytest.approx(100.0) and stats["eval_images"] == 2

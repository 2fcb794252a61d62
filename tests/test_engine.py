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

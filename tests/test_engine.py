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
    # the head ran in bfloat16, and its output reached the model's own box arithmetic in float32
    assert model.outputs[0]["boxes"].dtype == torch.float32
    assert out["boxes"].dtype == torch.float32 and out["scores"].dtype == torch.float32
    assert out["labels"].dtype == torch.int64
    assert torch.equal(out["boxes"], model.outputs[0]["boxes"])
    assert out["scores"].item() == pytest.approx(0.9, abs=4e-3)  # 0.9 rounded to bfloat16 (8 bits)
    assert out["scores"].item() != pytest.approx(0.9, abs=1e-6)
    assert not model.head._forward_hooks  # predict's float32 hooks are gone afterwards


def test_predict_under_amp_refuses_a_model_whose_head_it_does_not_know():
    from kdsweep.train.engine import predict

    class _Headless(torch.nn.Module):
        def forward(self, images):
            return [{"boxes": torch.zeros(0, 4)} for _ in images]

    with pytest.raises(ValueError, match=r"_Headless has none of the submodules backbone, head, .*FLOAT32_OUTPUTS"):
        predict(_Headless(), _val(1), torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert predict(_Headless(), _val(1), torch.device("cpu"))[0][0] == 1  # without AMP nothing is needed


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


# --------------------------------------------------------------- float32 box decoding under AMP
# Each arch's modules whose outputs the box arithmetic reads (the oracle's own list, independent of
# precision.FLOAT32_OUTPUTS): the FPN maps (the anchors' size and dtype) and every head output.
DECODE_INPUTS = {
    "retinanet": ("backbone", "head"),
    "fcos": ("backbone", "head"),
    "fasterrcnn": ("backbone", "rpn.head", "roi_heads.box_predictor"),
    "mimicdet": ("backbone", "refine", "s_head"),
}
WIDE = (64, 832)  # (H, W): anchors out to x = 832 px, where bfloat16 spaces its values 4 px apart


def _wide_detector(arch: str) -> torch.nn.Module:
    """A tiny untrained detector at 64x832 (``min_size`` 64, ``max_size`` 832: no resize) whose
    score thresholds are 0, so that it keeps its top-scoring boxes."""
    from kdsweep.config import ModelConfig
    from kdsweep.models.detectors import build_detector

    extra = {"rpn_proposals": 50, "roi_samples": 32} if arch == "fasterrcnn" else {}
    options = {"t_head": False, "neg_filter": 0.0, "score_thresh": 0.0} if arch == "mimicdet" else {}
    torch.manual_seed(0)
    model = build_detector(ModelConfig(arch=arch, backbone="resnet18", fpn_channels=16, min_size=WIDE[0],
                                       max_size=WIDE[1], options=options, **extra), 3)
    if arch in ("retinanet", "fcos"):
        model.score_thresh = 0.0
    elif arch == "fasterrcnn":
        model.roi_heads.score_thresh = 0.0
    return model.eval()


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in nested lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]


def _nearest_box_error(boxes: torch.Tensor, labels: torch.Tensor, ref_boxes: torch.Tensor, ref_labels: torch.Tensor) -> float:
    """Max over ``boxes`` (K, 4) of the distance (max |coordinate difference|, px) to the nearest
    reference box of the same label: order-free, so score ties cannot pair the wrong boxes."""
    worst = 0.0
    for box, label in zip(boxes, labels):
        same = ref_boxes[ref_labels == label]
        assert len(same), f"label {int(label)} has no reference box"
        worst = max(worst, float((same - box).abs().amax(1).min()))
    return worst


@pytest.mark.parametrize("arch", sorted(DECODE_INPUTS))
def test_predict_under_amp_decodes_boxes_in_float32(arch: str):
    """Issue 24.1. Oracle: the head outputs (and FPN maps) of the bfloat16 forward, cast to float32,
    pushed through the model's own float32 eval path (anchors, decoding, NMS, rescaling) by forward
    hooks that replace those outputs in a run without autocast. The AMP boxes must equal it to
    0.01 px; decoding in bfloat16 (anchors at x ~ 800 px rounded to multiples of 4) misses by
    about a pixel."""
    from kdsweep.train.engine import predict

    model = _wide_detector(arch)
    g = torch.Generator().manual_seed(1)
    loader = [([torch.rand(3, *WIDE, generator=g)], [{"image_id": torch.tensor(7)}])]
    recorded: dict[str, object] = {}
    handles = []
    for path in DECODE_INPUTS[arch]:
        def record(_m, _a, out, path=path):
            recorded[path] = out
        handles.append(model.get_submodule(path).register_forward_hook(record))
    (_, amp), = predict(model, loader, torch.device("cpu"), amp_dtype=torch.bfloat16)
    for handle in handles:
        handle.remove()
    from kdsweep.kd.precision import to_float32

    assert set(recorded) == set(DECODE_INPUTS[arch])
    raw = [t for t in _tensors(recorded[DECODE_INPUTS[arch][-1]]) if t.is_floating_point()]
    assert raw and all(t.dtype == torch.bfloat16 for t in raw)  # the last head did run in bfloat16

    handles = [model.get_submodule(path).register_forward_hook(lambda _m, _a, _o, path=path: to_float32(recorded[path]))
               for path in DECODE_INPUTS[arch]]
    try:
        with torch.no_grad():
            oracle = model([loader[0][0][0]])[0]
    finally:
        for handle in handles:
            handle.remove()
    assert oracle["boxes"].dtype == torch.float32 and len(oracle["boxes"]) > 10
    assert float(oracle["boxes"][:, 2].max()) > 512  # boxes out where bfloat16 steps by 4 px: rounding
    assert float((oracle["boxes"] - oracle["boxes"].bfloat16().float()).abs().max()) > 0.5  # them alone is > 0.5 px
    assert amp["boxes"].dtype == torch.float32 and amp["boxes"].shape == oracle["boxes"].shape
    error = _nearest_box_error(amp["boxes"], amp["labels"], oracle["boxes"], oracle["labels"])
    assert error <= 0.01, f"{arch}: AMP boxes are {error:.3f} px off a float32 decode of the same head outputs"


class _Holding(torch.nn.Module):
    """What train_one_epoch trains, as a Trainable does: a module holding the detector as ``student``."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student

    def forward(self, images, targets, progress=0.0):
        return self.student(images, targets)


TRAIN_WIDE = (64, 1333)  # anchors out to x = 1333 px, where bfloat16 spaces its values 8 px apart


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_training_under_amp_computes_anchors_box_targets_and_losses_in_float32(arch: str):
    """Oracle: the bfloat16 step's FPN maps and head outputs, cast to float32, pushed through the
    model's own float32 loss path (anchors, matching, box targets, GIoU decoding, focal loss) by
    hooks that replace those outputs in a forward without autocast. ``train_one_epoch``'s losses
    must equal it; the same step without the float32 casts misses by percents (RetinaNet's box
    regression 5.5 %, FCOS's centerness 1.9 %: anchors at x ~ 1300 rounded to multiples of 8)."""
    from kdsweep.config import ModelConfig
    from kdsweep.kd.precision import to_float32
    from kdsweep.models.detectors import build_detector

    torch.manual_seed(0)
    model = build_detector(ModelConfig(arch=arch, backbone="resnet18", fpn_channels=16, min_size=TRAIN_WIDE[0],
                                       max_size=TRAIN_WIDE[1]), 3)
    image = torch.rand(3, *TRAIN_WIDE, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[1200.3, 20.2, 1230.7, 51.9], [1290.1, 10.4, 1322.6, 42.8], [600.5, 12.5, 640.2, 50.9],
                          [1100.2, 5.3, 1160.9, 60.1]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 2, 3, 1])}
    paths = DECODE_INPUTS[arch]
    recorded: dict[str, object] = {}
    handles = [model.get_submodule(p).register_forward_hook(lambda _m, _a, out, p=p: recorded.__setitem__(p, out))
               for p in paths]  # registered first: they see the bfloat16 outputs
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    optimization = Optimization(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0), list(model.parameters()),
                                amp_dtype=torch.bfloat16)
    out = train_one_epoch(_Holding(model), optimization, [([image], [target])], device=torch.device("cpu"), epoch=1)
    for handle in handles:
        handle.remove()
    assert all(t.dtype == torch.bfloat16 for t in _tensors(recorded["head"]) if t.is_floating_point())
    assert not model.head._forward_hooks  # train_one_epoch's float32 hooks are gone afterwards

    def losses(replace: bool, autocast: bool) -> dict[str, float]:
        hooks = [model.get_submodule(p).register_forward_hook(lambda _m, _a, _o, p=p: to_float32(recorded[p]))
                 for p in paths] if replace else []
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return {k: float(v) for k, v in model([image], [target]).items()}
        finally:
            for hook in hooks:
                hook.remove()

    oracle = losses(replace=True, autocast=False)
    for key, value in oracle.items():
        assert out[f"loss/{key}"] == pytest.approx(value, rel=1e-5), (key, out[f"loss/{key}"], value)
    half = losses(replace=False, autocast=True)  # what the step computed before: anchors in bfloat16
    assert max(abs(half[k] / oracle[k] - 1) for k in oracle) > 0.01


@pytest.mark.parametrize("arch", ["fasterrcnn", "mimicdet"])
def test_an_amp_training_step_of_the_two_stage_detectors_keeps_their_anchors_in_float32(arch: str):
    """Faster R-CNN and MimicDet (its own staggered T-head, which reads the training-only P2 that
    the FPN output carries as an attribute: the float32 cast must keep it) train under bfloat16
    autocast with float32 anchors and finite losses."""
    from kdsweep.config import ModelConfig
    from kdsweep.models.detectors import build_detector

    extra = ({"rpn_proposals": 50, "roi_samples": 32} if arch == "fasterrcnn"
             else {"options": {"t_head": True, "staggered": True}})  # MimicDet's defaults: the T-head reads P2
    torch.manual_seed(0)
    model = build_detector(ModelConfig(arch=arch, backbone="resnet18", fpn_channels=16, min_size=96, max_size=96,
                                       anchor_scale=2.0, **extra), 3)
    dtypes: list[torch.dtype] = []
    if arch == "fasterrcnn":
        model.rpn.anchor_generator.register_forward_hook(lambda _m, _a, out: dtypes.append(out[0].dtype))

    g = torch.Generator().manual_seed(1)
    batch = ([torch.rand(3, 96, 96, generator=g) for _ in range(2)],
             [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0], [50.0, 20.0, 90.0, 70.0]]), "labels": torch.tensor([1, 2])}] * 2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    optimization = Optimization(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0), list(model.parameters()),
                                amp_dtype=torch.bfloat16)
    out = train_one_epoch(_Holding(model), optimization, [batch], device=torch.device("cpu"), epoch=1)
    assert out["loss"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in out.values())
    if arch == "fasterrcnn":
        assert dtypes == [torch.float32]

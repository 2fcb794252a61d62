"""Mixed precision on the CPU: the AMP branch of ``train_one_epoch`` (bfloat16 autocast, and
float16 with a ``GradScaler``) and the contract that every registry KD term computes in float32
under autocast (kdsweep.train.distiller.Trainable: autocast off inside the terms, inputs promoted).

Tolerances. Under autocast the student and teacher forwards give the terms their features in
bfloat16, whose unit roundoff is 2^-9 (0.2 %). A term is then a smooth function of inputs that
each carry up to 0.2 % relative error, so its value moves by a few tenths of a percent; SSIM's
min-max normalisation, the softmaxes of the logit mimics and CSA's attention amplify that a
little. We allow 1 % on the value (5x the roundoff) and 5 % (relative L2) on the gradient, which
sums many rounded products; what they guard against, an arithmetic done in bfloat16 itself,
loses far more (bfloat16 accumulation of a mean over 10^3-10^5 elements is off by percents, and a
variance E[x^2] - E[x]^2 in bfloat16 by its whole size).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from kdsweep.config import ExperimentConfig, KDTermConfig, ModelConfig
from kdsweep.train.distiller import build_distiller
from kdsweep.train.engine import train_one_epoch
from kdsweep.train.optim import Optimization
from kdsweep.methods import TERMS
from kdsweep.models.detectors import build_detector

K = 3
SIZE = 96  # P6 2x2: oneDNN's bfloat16 weight gradient of a stride-2 conv on a 1x1 map (P7 of a
# 64 px image) is NaN in about one call of five (torch 2.14 on the CPU; not our arithmetic)
VALUE_RTOL = 1e-2
GRAD_RTOL = 5e-2


def _model(arch: str, backbone: str = "resnet18", fpn: int = 16, **options) -> ModelConfig:
    extra = {"rpn_proposals": 50, "roi_samples": 32} if arch == "fasterrcnn" else {}
    return ModelConfig(arch=arch, backbone=backbone, fpn_channels=fpn, min_size=SIZE, max_size=SIZE, anchor_scale=2.0,
                       options=options, **extra)


MIMICDET_EXTERNAL = {"t_head": "external", "t_hidden": 1024, "t_samples": 32, "mimic_samples": 8}
CASES: dict[str, tuple[ModelConfig, ModelConfig, KDTermConfig]] = {
    "l1": (_model("retinanet"), _model("retinanet", fpn=32), KDTermConfig("l1", adapter=True)),
    "l2": (_model("retinanet"), _model("retinanet", fpn=32), KDTermConfig("l2", adapter=True)),
    "ssim": (_model("retinanet"), _model("retinanet", fpn=32), KDTermConfig("ssim", adapter=True)),
    "sdf": (_model("retinanet"), _model("retinanet", fpn=32), KDTermConfig("sdf")),
    # head "own": with the student's (shared) head and a fresh assistant, the assistant's outputs
    # nearly equal the student's, so L_cls's gradient is near 0 and L_bbox's L1 sits at its kink: a
    # relative gradient comparison would measure those (1e3 and 0.11 here), not the precision
    "csa": (_model("retinanet"), _model("retinanet", fpn=32), KDTermConfig("csa", params={"start": 0.0, "head": "own"})),
    "mimic": (_model("fasterrcnn"), _model("fasterrcnn", fpn=32), KDTermConfig("mimic", adapter=True, params={"num_rois": 16})),
    "mimic_full": (_model("fasterrcnn"), _model("fasterrcnn", fpn=32), KDTermConfig("mimic_full", adapter=True)),
    "mimic_logits": (_model("retinanet"), _model("retinanet", fpn=32), KDTermConfig("mimic_logits")),
    "mimic_head": (_model("fasterrcnn"), _model("fasterrcnn", fpn=32), KDTermConfig("mimic_head")),
    "mimicdet_teacher": (_model("mimicdet", **MIMICDET_EXTERNAL), _model("fasterrcnn"), KDTermConfig("mimicdet_teacher")),
    "pkd": (_model("retinanet"), _model("retinanet", fpn=32), KDTermConfig("pkd", adapter=True)),
    "cwd": (_model("retinanet"), _model("retinanet", fpn=32), KDTermConfig("cwd", adapter=True)),
    "mgd": (_model("retinanet"), _model("retinanet", fpn=32), KDTermConfig("mgd", adapter=True)),
    "fgd": (_model("retinanet"), _model("retinanet", fpn=32), KDTermConfig("fgd", adapter=True)),
    "crosskd": (_model("retinanet"), _model("retinanet", fpn=32), KDTermConfig("crosskd", adapter=True)),
}


def test_every_registry_key_has_a_case() -> None:
    assert set(CASES) == set(TERMS)


def _distiller(key: str):
    student, teacher_cfg, term = CASES[key]
    torch.manual_seed(1)
    teacher = build_detector(teacher_cfg, K)
    if key in ("mimic_logits", "crosskd"):  # untrained heads share the focal-loss prior bias, so their logits differ
        # by little: bfloat16 spacing at that bias (1/32) would decide the loss. A teacher that
        # disagrees with the student, as a trained one does, makes the comparison meaningful
        teacher.head.classification_head.cls_logits.bias.data.zero_()
    torch.manual_seed(0)
    return build_distiller(ExperimentConfig(student=student, teacher=teacher_cfg, kd=(term,)), K, teacher)


def _batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g), torch.rand(3, SIZE, SIZE, generator=g)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([K])},
               {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0], [30.0, 30.0, 62.0, 62.0]]), "labels": torch.tensor([1, 2])}]
    return images, targets


def _map(obj, fn):
    """``obj`` with ``fn`` applied to every floating tensor (lists, tuples, dicts, the context
    dataclasses; modules and other values kept)."""
    if isinstance(obj, Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return type(obj)((k, _map(v, fn)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)
                                           if f.init and not isinstance(getattr(obj, f.name), nn.Module)})
    return obj


def _floats(obj) -> list[Tensor]:
    found: list[Tensor] = []
    _map(obj, lambda t: found.append(t) or t)
    return found


def _total(out) -> Tensor:
    return sum(out.values()) if isinstance(out, dict) else out


def _forward(distiller, capture: list, autocast: bool):
    """One training forward; the term's inputs (and autocast state, input dtypes) recorded."""
    [term] = distiller.trainable.terms.values()
    student = distiller.student

    def spy(module, args):
        recorded = getattr(student, "last_mimic_inputs", None)  # MimicDet: the S-side of its mimic
        capture.append((torch.is_autocast_enabled("cpu"), {t.dtype for t in _floats(args)}, args, recorded))

    handle = term.register_forward_pre_hook(spy)
    images, targets = _batch()
    torch.manual_seed(5)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return distiller(images, targets, progress=0.5)
    finally:
        handle.remove()


@pytest.mark.parametrize("key", sorted(CASES))
def test_each_term_computes_in_float32_under_autocast(key: str) -> None:
    distiller = _distiller(key)
    distiller.train()
    [term] = distiller.trainable.terms.values()
    fp32: list = []
    _forward(distiller, fp32, autocast=False)
    amp: list = []
    losses = _forward(distiller, amp, autocast=True)
    sum(losses.values()).backward()
    assert [a[:2] for a in amp] == [(False, {torch.float32})], amp  # autocast off inside, float32 inputs
    kd = {k: v for k, v in losses.items() if k.startswith("kd_")}
    assert kd and all(v.dtype == torch.float32 and torch.isfinite(v) for v in kd.values()), kd
    grads = [p.grad for p in distiller.trainable.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    # the inputs of the float32 step, as they are and with the features rounded through bfloat16
    # (what an autocast forward hands over), with the same random draws: the term's value and
    # gradient stay close. Boxes keep float32 here: RoIAlign at rounded box corners samples other
    # pixels, a change of the regions, not of the term's arithmetic
    _, _, args32, recorded32 = fp32[0]

    def run(rounding):
        leaves: list[Tensor] = []

        def leaf(t: Tensor) -> Tensor:
            x = rounding(t.detach()).float().requires_grad_(t.requires_grad)
            if x.requires_grad:
                leaves.append(x)
            return x

        args = _map(args32, leaf)
        if recorded32 is not None:
            distiller.student.last_mimic_inputs = _map(recorded32, leaf)
        torch.manual_seed(7)
        out = _total(term(*args))
        own = [p for p in term.parameters() if p.requires_grad]
        grads = [g for g in torch.autograd.grad(out, leaves + own, allow_unused=True) if g is not None]
        assert grads, "the term's value depends on no student-side input"
        return out.detach(), torch.cat([g.reshape(-1) for g in grads])

    def half(t: Tensor) -> Tensor:  # features and logits in bfloat16; boxes (R, 4 or 5) as they are
        return t if t.dim() == 2 and t.shape[-1] in (4, 5) else t.to(torch.bfloat16)

    value32, grad32 = run(lambda t: t)
    value16, grad16 = run(half)
    assert torch.isfinite(value16) and torch.isfinite(grad16).all()
    value_error = float(abs(value16 - value32) / abs(value32))
    grad_error = float((grad16 - grad32).norm() / grad32.norm())
    assert 0 < value_error <= VALUE_RTOL, value_error  # > 0: the inputs did change
    # crosskd re-standardises each level's head feature per channel over (N, H, W): on P7 (1x1) of
    # a 2-image batch that is over 2 values, which magnifies the rounding of its inputs
    assert grad_error <= (2 * GRAD_RTOL if key == "crosskd" else GRAD_RTOL), grad_error


@dataclasses.dataclass
class _Fit:
    """What :func:`_fit` saw: the epoch's means, the largest parameter change, per training forward
    of the student ``(autocast on, autocast dtype, dtype of its first conv's output)``, and per step
    the total gradient norm ``clip_grad_norm_`` measured (before clipping)."""

    out: dict[str, float]
    moved: float
    forwards: list[tuple[bool, torch.dtype, torch.dtype]]
    clip_norms: list[float]


def _fit(dtype: torch.dtype, scaler: torch.amp.GradScaler | None, monkeypatch: pytest.MonkeyPatch) -> _Fit:
    distiller = _distiller("ssim")
    params = [p for p in distiller.trainable.parameters() if p.requires_grad]
    before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    optimization = Optimization(optimizer, scheduler, params, grad_clip=10.0, scaler=scaler, amp_dtype=dtype)
    forwards: list[tuple[bool, torch.dtype, torch.dtype]] = []

    def spy(module: nn.Module, _args, out: Tensor) -> None:
        if module.training:  # not the level-probing forward (eval mode)
            forwards.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))

    clip_norms: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(*args, **kwargs) -> Tensor:
        norm = clip(*args, **kwargs)
        clip_norms.append(float(norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    handle = distiller.student.backbone.body.conv1.register_forward_hook(spy)
    try:
        out = train_one_epoch(distiller, optimization, [_batch()] * 3, device=torch.device("cpu"), epoch=1)
    finally:
        handle.remove()
    moved = float((torch.cat([p.detach().reshape(-1) for p in params]) - before).abs().max())
    return _Fit(out, moved, forwards, clip_norms)


def test_the_amp_branch_trains_in_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    fit = _fit(torch.bfloat16, None, monkeypatch)
    assert all(torch.isfinite(torch.tensor(v)) for v in fit.out.values()) and fit.out["loss/kd_ssim"] > 0
    assert fit.moved > 0
    # the student's forward ran under bfloat16 autocast at every step: a conv gave bfloat16
    assert fit.forwards == [(True, torch.bfloat16, torch.bfloat16)] * 3


def _unscaled_grad_norm(dtype: torch.dtype) -> float:
    """Total gradient norm of :func:`_fit`'s first step (same model, batch and autocast), by a plain
    backward with no loss scaling."""
    distiller = _distiller("ssim")
    distiller.train()
    params = [p for p in distiller.trainable.parameters() if p.requires_grad]
    images, targets = _batch()
    from kdsweep.kd.precision import float32_decoding

    with torch.autocast("cpu", dtype=dtype), float32_decoding(distiller.student):  # as train_one_epoch runs it
        losses = distiller(images, targets, progress=0.0)
    sum(losses.values()).backward()
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params
                                                       if p.grad is not None])))


def test_the_grad_scaler_path_trains_in_float16(monkeypatch: pytest.MonkeyPatch) -> None:
    scale = 2.0**10
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    fit = _fit(torch.float16, scaler, monkeypatch)
    assert all(torch.isfinite(torch.tensor(v)) for v in fit.out.values())
    assert fit.moved > 0
    assert fit.forwards == [(True, torch.float16, torch.float16)] * 3
    # clipping saw the unscaled gradients (unscale_ before clip_grad_norm_): its norm is that of a
    # plain backward, not ``scale`` (1024) times it. float16 gradients of the plain backward lose
    # their smallest entries to underflow (what the scaler is for): 1e-4 here, 2 % allowed
    reference = _unscaled_grad_norm(torch.float16)
    assert len(fit.clip_norms) == 3 and all(torch.isfinite(torch.tensor(fit.clip_norms)))
    assert fit.clip_norms[0] == pytest.approx(reference, rel=0.02), (fit.clip_norms[0], reference)


def test_amp_settings_pick_the_dtype_and_the_scaler() -> None:
    from kdsweep.config import TrainConfig
    from kdsweep.train.optim import amp_settings

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_settings(TrainConfig(amp=False), cuda) == (False, None, None)
    enabled, dtype, scaler = amp_settings(TrainConfig(amp=True), cpu)
    assert (enabled, dtype, scaler) == (True, torch.bfloat16, None)
    enabled, dtype, scaler = amp_settings(TrainConfig(amp=True, amp_dtype="float16"), cpu)
    assert dtype is torch.float16 and isinstance(scaler, torch.amp.GradScaler)

"""ScaleKD on the Distiller: sdf on the backbone embedding, csa with its own loss and optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kdsweep.config import ConfigError, ExperimentConfig, KDTermConfig, ModelConfig, TrainConfig
from kdsweep.train.distiller import build_distiller
from kdsweep.kd.term import Need
from kdsweep.methods.scalekd.terms import SCALEKD_DEFAULTS, CSATerm, SDFTerm
from kdsweep.models.detectors import build_detector
from kdsweep.train.engine import train_one_epoch
from kdsweep.train.optim import build_optimization

K = 3


def student_cfg(arch: str = "retinanet") -> ModelConfig:
    return ModelConfig(arch=arch, backbone="resnet18", fpn_channels=16, min_size=64, max_size=64, anchor_scale=2.0)


def teacher() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_detector(ModelConfig(backbone="resnet34", fpn_channels=32, min_size=64, max_size=64, anchor_scale=2.0), K)


def batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([K])},
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


def scalekd(start: float = 0.0, scale: float = 2.0, sdf: dict | None = None):
    torch.manual_seed(0)
    kd = (
        KDTermConfig("sdf", weight=0.01, params=dict({"embed": 8, "pool": 2}, **(sdf or {}))),
        KDTermConfig("csa", params={"num_heads": 2, "ratios": [1, 2], "start": start}),
    )
    cfg = ExperimentConfig(student=student_cfg(), kd=kd, teacher_scale=scale)
    return build_distiller(cfg, K, teacher())


def test_losses_have_every_part_and_defaults() -> None:
    distiller = scalekd()
    losses = distiller(*batch())
    assert {"kd_sdf", "kd_csa_assist", "kd_csa_cls", "kd_csa_bbox", "classification", "bbox_regression"} <= set(losses)
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    csa = distiller._inner.terms["csa"]
    assert isinstance(csa, CSATerm)
    assert (csa.beta, csa.gamma) == (SCALEKD_DEFAULTS["one_stage"]["beta"], SCALEKD_DEFAULTS["one_stage"]["gamma"])
    own = csa.own_optimizer()
    assert isinstance(own, torch.optim.Adam)
    assert (own.param_groups[0]["lr"], own.param_groups[0]["weight_decay"]) == (3e-4, 1e-4)


def test_sdf_reads_the_last_backbone_stage_of_both_models_at_their_resolutions() -> None:
    distiller = scalekd(scale=2.0)
    seen = {}
    term = distiller._inner.terms["sdf"]
    assert isinstance(term, SDFTerm) and term.needs == {Need.BODY}
    original = SDFTerm.forward

    def spy(self, step):
        seen["s"], seen["t"] = step.student_body.shape, step.teacher_out.body.shape
        return original(self, step)

    SDFTerm.forward = spy
    try:
        distiller(*batch())
    finally:
        SDFTerm.forward = original
    assert seen["s"] == (2, 512, 2, 2)  # resnet18 C5 of a 64 px input
    assert seen["t"] == (2, 512, 4, 4)  # the teacher sees 128 px (teacher_scale 2)


def test_the_l2_on_c5_control_row_is_the_plain_l2_of_the_backbone_embeddings() -> None:
    """The control of the SDF rows: what an ``sdf`` row with ``direct: 1`` added to SDF (weight
    0.01 x MSE of the adapted C5 maps), alone: ``l2`` with ``source: body``."""
    torch.manual_seed(0)
    cfg = ExperimentConfig(student=student_cfg(), kd=(KDTermConfig("l2", weight=0.01, params={"source": "body"}),),
                           teacher_scale=2.0)
    distiller = build_distiller(cfg, K, teacher())
    term = distiller._inner.terms["l2"]
    assert term.needs == {Need.BODY} and term.num_levels == 1
    seen = {}
    hooks = [distiller.student.backbone.body.register_forward_hook(lambda m, i, o: seen.__setitem__("s", list(o.values())[-1])),
             distiller.teacher.backbone.body.register_forward_hook(lambda m, i, o: seen.__setitem__("t", list(o.values())[-1]))]
    losses = distiller(*batch())
    for h in hooks:
        h.remove()
    assert seen["t"].shape[-1] == 2 * seen["s"].shape[-1]  # the teacher at 2x
    t = torch.nn.functional.interpolate(seen["t"], size=seen["s"].shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["kd_l2"], 0.01 * torch.nn.functional.mse_loss(seen["s"], t))
    with pytest.raises(ConfigError, match="source 'c5' is unknown"):
        build_distiller(ExperimentConfig(student=student_cfg(), kd=(KDTermConfig("l2", params={"source": "c5"}),)), K,
                        teacher())


def grads_after(loss: Tensor, module: torch.nn.Module) -> dict[str, bool]:
    module.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in module.named_parameters()}


def test_assistant_loss_trains_only_the_assistant_and_distillation_only_the_student() -> None:
    distiller = scalekd()
    losses = distiller(*batch())
    inner = distiller._inner
    got = grads_after(losses["kd_csa_assist"], inner)
    assert any(v for k, v in got.items() if k.startswith("terms.csa.assistant"))
    assert not any(v for k, v in got.items() if k.startswith("student."))
    got = grads_after(losses["kd_csa_cls"] + losses["kd_csa_bbox"], inner)
    assert any(v for k, v in got.items() if k.startswith("student.head"))
    assert not any(v for k, v in got.items() if k.startswith("terms.csa"))


def test_assistant_joins_at_start_fraction() -> None:
    distiller = scalekd(start=0.5)
    images, targets = batch()
    early = distiller(images, targets, progress=0.2)
    late = distiller(images, targets, progress=0.5)
    for part in ("assist", "cls", "bbox"):
        assert early[f"kd_csa_{part}"].item() == 0.0
        assert late[f"kd_csa_{part}"].item() > 0.0


def test_assistant_has_its_own_optimizer() -> None:
    distiller = scalekd()
    optimization = build_optimization(distiller.trainable, distiller.student, TrainConfig(optimizer="adamw", lr=1e-3),
                                      torch.device("cpu"), steps_per_epoch=4)
    main = [p for g in optimization.optimizer.param_groups for p in g["params"]]
    csa_ids = {id(p) for p in distiller._inner.terms["csa"].parameters()}
    [(own, steps_at)] = optimization.term_optimizers
    assert isinstance(own, torch.optim.Adam) and steps_at(0.0)
    assert {id(p) for g in own.param_groups for p in g["params"]} == csa_ids
    assert own.param_groups[0]["lr"] == 3e-4 and own.param_groups[0]["weight_decay"] == 1e-4
    assert not csa_ids & {id(p) for p in main}
    assert len(main) + len(csa_ids) == sum(1 for p in distiller.trainable.parameters() if p.requires_grad)


def test_the_assistant_is_untouched_before_start_then_trains() -> None:
    """Issue 13: before ``start`` neither the assistant's Adam nor its weight decay may move it."""
    distiller = scalekd(start=0.5)
    optimization = build_optimization(distiller.trainable, distiller.student,
                                      TrainConfig(optimizer="adamw", lr=1e-3, epochs=2, warmup_iters=0, lr_schedule="constant"),
                                      torch.device("cpu"), steps_per_epoch=2)
    assistant = list(distiller._inner.terms["csa"].assistant.parameters())
    before = [p.detach().clone() for p in assistant]
    head = list(distiller.student.head.parameters())
    head_before = [p.detach().clone() for p in head]
    loader = [batch(), batch()]
    train_one_epoch(distiller, optimization, loader, device=torch.device("cpu"), epoch=1, step_offset=0, total_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(before, assistant))  # progress 0 and 0.25: bit-identical
    assert any(not torch.equal(a, b) for a, b in zip(head_before, head))  # the student did train
    train_one_epoch(distiller, optimization, loader, device=torch.device("cpu"), epoch=2, step_offset=2, total_steps=4)
    assert any(not torch.equal(a, b) for a, b in zip(before, assistant))  # from 0.5 on it trains


def test_frozen_backbone_does_not_move_until_the_fraction_then_moves() -> None:
    distiller = scalekd()
    optimization = build_optimization(distiller.trainable, distiller.student,
                                      TrainConfig(optimizer="adamw", lr=1e-3, epochs=2, warmup_iters=0,
                                                  lr_schedule="constant", freeze_backbone=0.5),
                                      torch.device("cpu"), steps_per_epoch=2)
    body = list(distiller.student.backbone.body.parameters())
    head = list(distiller.student.head.parameters())
    before_body = [p.detach().clone() for p in body]
    before_head = [p.detach().clone() for p in head]
    loader = [batch(), batch()]
    train_one_epoch(distiller, optimization, loader, device=torch.device("cpu"), epoch=1, step_offset=0, total_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(before_body, body))
    assert any(not torch.equal(a, b) for a, b in zip(before_head, head))
    train_one_epoch(distiller, optimization, loader, device=torch.device("cpu"), epoch=2, step_offset=2, total_steps=4)
    assert any(not torch.equal(a, b) for a, b in zip(before_body, body))


def test_csa_needs_a_dense_one_stage_student_and_every_level() -> None:
    kd = (KDTermConfig("csa"),)
    with pytest.raises(ConfigError, match="kd.csa needs a RetinaNet or FCOS student"):
        build_distiller(ExperimentConfig(student=student_cfg("fasterrcnn"), kd=kd), K, teacher())
    kd = (KDTermConfig("csa", levels=("p3",)),)
    with pytest.raises(ConfigError, match="every student level"):
        build_distiller(ExperimentConfig(student=student_cfg(), kd=kd), K, teacher())
    kd = (KDTermConfig("csa", params={"ratios": [1, 2, 3]}),)
    with pytest.raises(ConfigError, match="multiple of the number of ratios"):
        build_distiller(ExperimentConfig(student=student_cfg(), kd=kd), K, teacher())
    kd = (KDTermConfig("sdf", params={"source": "head"}),)
    with pytest.raises(ConfigError, match="source 'head' is unknown"):
        build_distiller(ExperimentConfig(student=student_cfg(), kd=kd), K, teacher())


# ------------------------------------------------------------------ the two readings of the CSA write-up
def test_teacher_queries_make_the_attention_weights_independent_of_the_student() -> None:
    """``query: teacher`` (the prose: "F_T is projected to Q and K, F_S to V"): the attention
    weights come from the teacher alone, so the output minus its residual is affine in the
    student's map. The default (the equations: "Q_i = F_S W_i^Q") is not."""
    from kdsweep.methods.scalekd.csa import MultiScaleCrossAttention

    g = torch.Generator().manual_seed(0)
    s1, s2, t = torch.randn(1, 8, 4, 4, generator=g), torch.randn(1, 8, 4, 4, generator=g), torch.randn(1, 12, 8, 8, generator=g)

    def residual_part(attn, s):
        return attn(t if attn.query_dim == 12 else s, t, s) - s

    for query_dim, affine in ((12, True), (None, False)):
        torch.manual_seed(0)
        attn = MultiScaleCrossAttention(8, 12, num_heads=2, ratios=[1, 2], query_dim=query_dim).eval()
        with torch.no_grad():
            mixed = residual_part(attn, 0.3 * s1 + 0.7 * s2)
            blend = 0.3 * residual_part(attn, s1) + 0.7 * residual_part(attn, s2)
        assert torch.allclose(mixed, blend, atol=1e-5) is affine


def csa_only(arch: str = "retinanet", **params) -> torch.nn.Module:
    torch.manual_seed(0)
    kd = (KDTermConfig("csa", params={"num_heads": 2, "ratios": [1, 2], "start": 0.0, **params}),)
    return build_distiller(ExperimentConfig(student=student_cfg(arch), kd=kd, teacher_scale=2.0), K, teacher())


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_an_assistant_that_adds_nothing_through_the_students_head_has_the_students_own_loss(arch: str) -> None:
    """Oracle of the supervision path, RetinaNet and FCOS (the paper reports both): with the
    attention's output projection at zero the attended features are the student's, so with the
    student's head (``head: student``) the assistant's ground-truth loss is the student's own
    detection loss, L_bbox is 0 and L_cls is the entropy of the student's own scores."""
    distiller = csa_only(arch, head="student")
    for attn in distiller._inner.terms["csa"].assistant.attention:
        torch.nn.init.zeros_(attn.out_proj.weight)
        torch.nn.init.zeros_(attn.out_proj.bias)
    losses = distiller(*batch())
    own = sum(v for k, v in losses.items() if not k.startswith("kd_"))
    assert set(losses) - {"kd_csa_assist", "kd_csa_cls", "kd_csa_bbox"} == (
        {"classification", "bbox_regression", "bbox_ctrness"} if arch == "fcos" else {"classification", "bbox_regression"})
    torch.testing.assert_close(losses["kd_csa_assist"], own)
    assert losses["kd_csa_bbox"].item() == 0.0 and losses["kd_csa_cls"].item() > 0


def test_an_fcos_student_gets_an_fcos_assistant_trained_by_fcos_loss_alone() -> None:
    from torchvision.models.detection.fcos import FCOSHead

    distiller = csa_only("fcos", head="own")
    term = distiller._inner.terms["csa"]
    assert isinstance(term.assistant.head, FCOSHead) and term.detector == "fcos"
    assert len(term.assistant.head.classification_head.conv) == 2 * 3  # num_convs 2: conv, GroupNorm, ReLU each
    losses = distiller(*batch())
    assert all(torch.isfinite(losses[k]) and losses[k].item() > 0 for k in ("kd_csa_assist", "kd_csa_cls", "kd_csa_bbox"))
    got = grads_after(losses["kd_csa_assist"], distiller._inner)
    assert any(v for k, v in got.items() if k.startswith("terms.csa.assistant.head"))
    assert not any(v for k, v in got.items() if k.startswith("student."))


def test_the_papers_readings_are_the_defaults_and_the_others_are_options() -> None:
    term = csa_only()._inner.terms["csa"]
    assert (term.head, term.assistant.query) == ("student", "student") and term.assistant.head is None
    assert csa_only(head="own")._inner.terms["csa"].assistant.head is not None
    teacher_q = csa_only(query="teacher")._inner.terms["csa"]
    assert teacher_q.assistant.attention[0].q_proj.in_channels == 32  # the teacher's FPN channels
    with pytest.raises(ConfigError, match="kd.csa.params.query 'both' is unknown"):
        csa_only(query="both")
    with pytest.raises(ConfigError, match="kd.csa.params.head 'shared' is unknown"):
        csa_only(head="shared")


def test_the_student_head_reading_predicts_with_the_students_head_and_trains_only_the_attention() -> None:
    distiller = csa_only()
    inner = distiller._inner
    term = inner.terms["csa"]
    assert term.assistant.head is None  # no head of its own: the attention layers alone
    assert sum(p.numel() for p in term.parameters()) < sum(p.numel() for p in csa_only(head="own")._inner.terms["csa"].parameters())
    losses = distiller(*batch())
    got = grads_after(losses["kd_csa_assist"], inner)
    assert any(v for k, v in got.items() if k.startswith("terms.csa.assistant.attention"))
    assert not any(v for k, v in got.items() if k.startswith("student."))  # the student's head is read, not trained
    got = grads_after(losses["kd_csa_cls"] + losses["kd_csa_bbox"], inner)
    assert any(v for k, v in got.items() if k.startswith("student.head")) and not any(
        v for k, v in got.items() if k.startswith("terms.csa"))


# ------------------------------------------- issue 24.4: the assistant's losses normalised like the detection loss
QUICK_K = 6  # the quick preset: 6 synthetic classes, batches of 8 images of 128 px with 2-8 objects each
PRIOR, CONFIDENT = -4.59512, 2.94444  # logit(0.01) (RetinaNet/FCOS's prior), logit(0.95)


def quick_batch(n: int = 8, size: int = 128) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    g = torch.Generator().manual_seed(3)
    images, targets = [], []
    for _ in range(n):
        m = int(torch.randint(2, 9, (1,), generator=g))
        w = torch.empty(m).uniform_(2.3, 4.1, generator=g).exp()  # 10-60 px, log-uniform
        h = w * torch.empty(m).uniform_(0.6, 1.6, generator=g)
        x0, y0 = torch.rand(m, generator=g) * (size - w), torch.rand(m, generator=g) * (size - h).clamp_min(0)
        boxes = torch.stack([x0, y0, x0 + w, (y0 + h).clamp_max(size)], dim=1)
        images.append(torch.rand(3, size, size, generator=g))
        targets.append({"boxes": boxes, "labels": torch.randint(1, QUICK_K + 1, (m,), generator=g)})
    return images, targets


def quick_csa_with_a_ground_truth_assistant(arch: str):
    """The quick preset's student (R18, 32 FPN channels, GroupNorm head, 128 px) with ``csa``
    whose assistant predicts the ground truth, as a trained one does: on the positive anchors of
    torchvision's own matching (recorded from the student's own loss) the ground-truth class at
    probability 0.95 and the ground-truth box deltas, elsewhere the prior 0.01."""
    torch.manual_seed(0)
    model = dict(arch=arch, min_size=128, max_size=128, anchor_scale=2.0, head_norm=True)
    teacher = build_detector(ModelConfig(backbone="resnet18", fpn_channels=16, **model), QUICK_K)
    kd = (KDTermConfig("csa", params={"num_heads": 2, "ratios": [1, 2], "start": 0.0, "head": "own"}),)
    distiller = build_distiller(ExperimentConfig(student=ModelConfig(backbone="resnet18", fpn_channels=32, **model), kd=kd),
                                QUICK_K, teacher)
    student, term = distiller.student, distiller._inner.terms["csa"]
    seen: list[tuple] = []
    own_loss = student.head.compute_loss

    def record(targets, head_outputs, anchors, matched_idxs):
        seen.append((targets, head_outputs, anchors, matched_idxs))
        return own_loss(targets, head_outputs, anchors, matched_idxs)

    def ground_truth(student_levels, teacher_levels):
        targets, head_outputs, anchors, matched = seen[0]  # the student's own detection loss
        cls = torch.full_like(head_outputs["cls_logits"], PRIOR)
        box = head_outputs["bbox_regression"].detach().clone()
        for n, (t, a, m) in enumerate(zip(targets, anchors, matched)):
            fg = m >= 0
            cls[n, fg, t["labels"][m[fg]]] = CONFIDENT
            gt, coder = t["boxes"][m[fg]], student.box_coder  # RetinaNet's BoxCoder, FCOS's BoxLinearCoder
            box[n, fg] = coder.encode_single(gt, a[fg]) if hasattr(coder, "encode_single") else coder.encode(a[fg], gt)
        out = {"cls_logits": cls, "bbox_regression": box}
        if "bbox_ctrness" in head_outputs:
            out["bbox_ctrness"] = head_outputs["bbox_ctrness"].detach()
        return out

    student.head.compute_loss = record
    term.assistant.forward = ground_truth
    losses = distiller(*quick_batch())
    return losses, seen[0]


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_a_trained_assistant_distils_classification_as_strongly_as_the_detection_loss(arch: str) -> None:
    """Issue 24.4: ``beta * L_cls``'s gradient on the student's logits is within 10x of the
    detection classification loss's (torchvision's focal loss / #positives). Averaged over every
    anchor and class (N A K = 8 x 3069 x 7 at the quick preset) it was ~600x weaker."""
    losses, (_, head_outputs, _, matched) = quick_csa_with_a_ground_truth_assistant(arch)
    assert sum(int((m >= 0).sum()) for m in matched) > 50  # a realistic number of positives
    logits = head_outputs["cls_logits"]
    g_det = torch.autograd.grad(losses["classification"], logits, retain_graph=True)[0]
    g_kd = torch.autograd.grad(losses["kd_csa_cls"], logits, retain_graph=True)[0]
    ratio = float(g_det.norm() / g_kd.norm())
    assert 0.1 < ratio < 10, f"detection / csa gradient norm on the student's logits: {ratio:.1f}"


def test_l_bbox_of_an_assistant_that_predicts_the_ground_truth_boxes_is_retinanets_regression_loss() -> None:
    """Identity of the normaliser: the assistant's deltas are the encoded ground truth on the
    positives, so gamma * L_bbox = gamma * torchvision's L1 regression loss (sum over the 4
    coordinates of the positive anchors / max(1, #positives) per image, mean over images)."""
    losses, _ = quick_csa_with_a_ground_truth_assistant("retinanet")
    gamma = SCALEKD_DEFAULTS["one_stage"]["gamma"]
    torch.testing.assert_close(losses["kd_csa_bbox"], gamma * losses["bbox_regression"])


def test_the_gradient_clip_leaves_out_the_assistant_and_its_own_adam() -> None:
    """Issue 24.4: the assistant's parameters have their own Adam; a huge assistant gradient must
    not shrink the student's clipped gradient (nor is the assistant's clipped)."""
    distiller = csa_only()
    optimization = build_optimization(distiller.trainable, distiller.student,
                                      TrainConfig(optimizer="adamw", lr=1e-3, grad_clip=1.0), torch.device("cpu"),
                                      steps_per_epoch=4)
    csa_ids = {id(p) for p in distiller._inner.terms["csa"].parameters()}
    params = [p for p in distiller.trainable.parameters() if p.requires_grad]
    student = [p for p in params if id(p) not in csa_ids]
    assistant = [p for p in params if id(p) in csa_ids]
    assert student and assistant
    numel = sum(p.numel() for p in student)
    def norm(grads: list[Tensor]) -> float:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    for student_norm in (0.5, 4.0):  # under the clip: untouched; over it: clipped to norm 1
        for p in student:
            p.grad = torch.full_like(p, student_norm / numel**0.5)
        for p in assistant:
            p.grad = torch.full_like(p, 1e6)
        before = [p.grad.clone() for p in student]
        optimization.step(progress=0.5)
        scale = min(1.0, 1.0 / norm(before))
        for p, g in zip(student, before):
            torch.testing.assert_close(p.grad, g * scale, rtol=1e-5, atol=0)
        assert all(torch.equal(p.grad, torch.full_like(p, 1e6)) for p in assistant)
    assert not {id(p) for p in optimization.params} & csa_ids  # the clipped set

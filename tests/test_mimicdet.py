"""MimicDet (kdsweep.methods.mimicdet.model): shapes through every head on odd image sizes, guided
deformable offsets from the refinement output, staggered levels, an inference path free of P2 and
the T-head, mimic identities and gradients, losses, detections in image coordinates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdsweep.models.detectors import level_names, level_strides
from kdsweep.methods.mimicdet.model import MimicDet, build_mimicdet, mimic_similarity
from kdsweep.models.taps import FeatureTap

K = 3  # object classes, labels 1..K
C = 16  # FPN width
HIDDEN = 32  # T-head fc width
SIZES = [(97, 131), (128, 128)]  # odd sizes; batch padded to (128, 160) at min 128 / max 160
LOSS_KEYS = {"refine_cls", "refine_reg", "s_cls", "s_reg", "t_cls", "t_reg", "mimic"}


def tiny(**kw) -> MimicDet:
    torch.manual_seed(0)
    base = dict(fpn_channels=C, t_hidden=HIDDEN, min_size=128, max_size=160, t_samples=32, mimic_samples=16)
    return build_mimicdet("resnet18", K, **{**base, **kw})


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in SIZES]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


class Recorder:
    """Forward hooks recording module outputs (and pre-hooks recording inputs) by name."""

    def __init__(self) -> None:
        self.out: dict[str, object] = {}
        self.inp: dict[str, tuple] = {}
        self.calls: dict[str, int] = {}
        self.handles: list = []

    def output(self, name: str, module: nn.Module) -> None:
        self.handles.append(module.register_forward_hook(lambda m, i, o: self.out.__setitem__(name, o)))

    def inputs(self, name: str, module: nn.Module) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda m, i: self.inp.__setitem__(name, i)))

    def count(self, name: str, module: nn.Module) -> None:
        self.calls[name] = 0

        def hook(m, i, o) -> None:
            self.calls[name] += 1

        self.handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def padded_sizes(model: MimicDet, images: list[torch.Tensor]) -> dict[int, tuple[int, int]]:
    """Expected (H, W) of P2..P7 for the transformed, padded batch."""
    with torch.no_grad():
        image_list, _ = model.transform(images)
    h, w = image_list.tensors.shape[-2:]
    assert h % 32 == 0 and w % 32 == 0
    sizes = {k: (h // 2**k, w // 2**k) for k in (2, 3, 4, 5)}
    for k in (6, 7):  # stride-2 3x3 convs (padding 1) on P5 then P6
        ph, pw = sizes[k - 1]
        sizes[k] = (math.ceil(ph / 2), math.ceil(pw / 2))
    return sizes


# ------------------------------------------------------------------------------------- shapes
def test_shapes_through_every_head() -> None:
    model = tiny()
    model.train()
    images, targets = batch()
    rec = Recorder()
    for name in ("backbone", "refine", "s_head", "t_head"):
        rec.output(name, getattr(model, name))
    losses = model(images, targets)
    rec.remove()
    assert set(losses) == LOSS_KEYS
    sizes = padded_sizes(model, images)
    n, a = len(images), model.num_anchors
    assert a == 1  # default: one square anchor per position

    pyramid = rec.out["backbone"]
    assert list(pyramid) == ["p3", "p4", "p5", "p6", "p7"]
    assert pyramid.p2.shape == (n, C, *sizes[2])
    for k in range(3, 8):
        assert pyramid[f"p{k}"].shape == (n, C, *sizes[k])
    objectness, deltas = rec.out["refine"]
    cls, reg, reg_feats = rec.out["s_head"]
    for level, k in enumerate(range(3, 8)):
        assert objectness[level].shape == (n, a, *sizes[k])
        assert deltas[level].shape == (n, 4 * a, *sizes[k])
        assert cls[level].shape == (n, a * (K + 1), *sizes[k])  # softmax S-head: background + K
        assert reg[level].shape == (n, 4 * a, *sizes[k])
        assert reg_feats[level].shape == (n, a * HIDDEN, *sizes[k])  # each anchor's own t_hidden-d feature
    logits, t_deltas, t_feat = rec.out["t_head"]
    rois = logits.shape[0]
    assert 0 < rois <= n * 32
    assert logits.shape == (rois, K + 1) and t_deltas.shape == (rois, 4) and t_feat.shape == (rois, HIDDEN)


def test_shapes_with_several_anchors_and_sigmoid_head() -> None:
    model = tiny(aspect_ratios=(0.5, 1.0, 2.0), scales_per_octave=2, s_cls_loss="sigmoid")
    images, targets = batch()
    rec = Recorder()
    rec.output("s_head", model.s_head)
    rec.output("refine", model.refine)
    losses = model(images, targets)
    rec.remove()
    assert all(torch.isfinite(v) for v in losses.values())
    sizes = padded_sizes(model, images)
    assert model.num_anchors == 6
    cls, reg, _ = rec.out["s_head"]
    assert cls[0].shape == (2, 6 * K, *sizes[3]) and reg[4].shape == (2, 24, *sizes[7])
    assert rec.out["refine"][1][2].shape == (2, 24, *sizes[5])


# -------------------------------------------------------------------------- guided offsets
def test_deform_offsets_are_the_offset_net_applied_to_the_refinement_regression() -> None:
    model = tiny()
    model.eval()
    images, _ = batch()
    head = model.s_head
    rec = Recorder()
    rec.output("refine", model.refine)
    rec.inputs("dconv3", head.dconv3)
    rec.inputs("dconv5", head.dconv5)
    offsets5: list[torch.Tensor] = []
    rec.handles.append(head.dconv5.register_forward_pre_hook(lambda m, i: offsets5.append(i[1])))
    with torch.no_grad():
        model(images)
        _, deltas = rec.out["refine"]
        assert head.kernels == (3, 5, 5, 5, 5)
        assert rec.inp["dconv3"][1].shape[1] == 2 * 3 * 3 and offsets5[0].shape[1] == 2 * 5 * 5
        torch.testing.assert_close(rec.inp["dconv3"][1], head.offset3(deltas[0]))  # P3: 3x3
        assert len(offsets5) == 4  # P4..P7: 5x5
        for level in range(4):
            torch.testing.assert_close(offsets5[level], head.offset5(deltas[level + 1]))
        before3, before5 = rec.inp["dconv3"][1].clone(), [o.clone() for o in offsets5]

        # Patch the refinement module's regression output: the offsets follow it.
        def patch(module, inputs, output):
            obj, reg = output
            return obj, [r + 0.5 for r in reg]

        offsets5.clear()
        handle = model.refine.register_forward_hook(patch)
        model(images)
        handle.remove()
        rec.remove()
        patched = [d + 0.5 for d in deltas]
        torch.testing.assert_close(rec.inp["dconv3"][1], head.offset3(patched[0]))
        for level in range(4):
            torch.testing.assert_close(offsets5[level], head.offset5(patched[level + 1]))
        assert not torch.allclose(rec.inp["dconv3"][1], before3)
        assert not any(torch.allclose(a, b) for a, b in zip(offsets5, before5))


# --------------------------------------------------------------------------- staggered levels
@pytest.mark.parametrize("staggered", [True, False])
def test_staggered_level_assignment(staggered: bool) -> None:
    model = tiny(staggered=staggered)
    images, targets = batch()
    rec = Recorder()
    rec.output("backbone", model.backbone)
    rec.inputs("pooler", model.t_head.pooler)
    rec.inputs("s_head", model.s_head)
    rec.inputs("refine", model.refine)
    model(images, targets)
    rec.remove()
    pyramid = rec.out["backbone"]
    t_feats = rec.inp["pooler"][0]
    s_feats = rec.inp["s_head"][0]
    t_levels = ["p2", "p3", "p4", "p5", "p6"] if staggered else ["p3", "p4", "p5", "p6", "p7"]
    assert list(t_feats) == t_levels == model.t_head.pooler.featmap_names
    all_levels = {"p2": pyramid.p2, **pyramid}
    for name in t_levels:
        assert t_feats[name] is all_levels[name]
    for feats in (s_feats, rec.inp["refine"][0]):
        assert [f.shape for f in feats] == [pyramid[f"p{k}"].shape for k in range(3, 8)]
        assert all(f is pyramid[f"p{k}"] for f, k in zip(feats, range(3, 8)))
    assert model.backbone.with_p2 is staggered
    assert len(model.backbone.fpn.inner_blocks) == (4 if staggered else 3)
    assert (pyramid.p2 is not None) is staggered
    # RoI level mapping: a box the size of S-level k's anchor pools from T-level k-1 (staggered)
    # or k; strides are fixed, not inferred.
    pooler = model.t_head.pooler
    assert pooler.scales == [2.0**-int(name[1]) for name in t_levels]
    for k in (3, 4, 5, 6):
        side = 4.0 * 2**k  # anchor_scale 4
        box = torch.tensor([[0.0, 0.0, side, side]])
        level = int(pooler.map_levels([box])[0]) + int(t_levels[0][1])
        assert level == (k - 1 if staggered else k)


# ---------------------------------------------------------------------------- inference path
def test_inference_computes_neither_p2_nor_the_t_head() -> None:
    model = tiny()
    images, targets = batch()
    fpn = model.backbone.fpn
    rec = Recorder()
    watched = {"p2_lateral": fpn.inner_blocks[0], "p2_output": fpn.layer_blocks[0], "s_head": model.s_head,
               "refine": model.refine}
    watched.update({f"t_head.{n}" if n else "t_head": m for n, m in model.t_head.named_modules()})
    for name, module in watched.items():
        rec.count(name, module)
    rec.output("backbone", model.backbone)

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    assert {name: n for name, n in rec.calls.items() if n} == {"s_head": 1, "refine": 1}
    assert rec.out["backbone"].p2 is None and list(rec.out["backbone"]) == ["p3", "p4", "p5", "p6", "p7"]

    model.train()
    model(images, targets)  # sanity: the counters do see training
    rec.remove()
    assert rec.calls["p2_lateral"] == rec.calls["p2_output"] == 1
    assert rec.calls["t_head"] == rec.calls["t_head.cls_score"] == rec.calls["t_head.pooler"] == 1


def test_p3_to_p7_do_not_depend_on_computing_p2() -> None:
    model = tiny()
    images, _ = batch()
    x = model.transform(images)[0].tensors
    backbone = model.backbone
    with torch.no_grad():
        backbone.eval()
        without = backbone(x)
        backbone.train()
        for m in backbone.modules():  # training-mode FPN path, eval-mode BatchNorm statistics
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        with_p2 = backbone(x)
    assert without.p2 is None and with_p2.p2 is not None
    for name in without:
        torch.testing.assert_close(without[name], with_p2[name])


# --------------------------------------------------------------------------------------- mimic
def test_mimic_similarity_identities() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, HIDDEN, generator=g)
    for similarity in ("cosine", "l2"):
        assert mimic_similarity(x, x.clone(), similarity).abs().item() < 1e-6
    assert mimic_similarity(x, 3 * x, "cosine").abs().item() < 1e-6  # scale-free
    torch.testing.assert_close(mimic_similarity(x, -x, "cosine"), torch.tensor(2.0))
    torch.testing.assert_close(mimic_similarity(x, x + 1, "l2"), torch.tensor(1.0))
    empty = torch.zeros(0, 4, requires_grad=True)
    assert mimic_similarity(empty, empty.detach(), "cosine").item() == 0.0
    with pytest.raises(ValueError):
        mimic_similarity(x, x, "kl")


@pytest.mark.parametrize("similarity", ["cosine", "l2"])
def test_mimic_gradients_reach_the_s_head_not_the_t_head(similarity: str) -> None:
    model = tiny(similarity=similarity)
    images, targets = batch()
    losses = model(images, targets)
    losses["mimic"].backward()
    head = model.s_head
    for name, param in [("cls_logits", head.cls_logits.weight), ("reg_tower", head.reg_tower[0].weight),
                        ("cls_tower", head.cls_tower[0].weight), ("dconv3", head.dconv3.weight),
                        ("dconv5", head.dconv5.weight), ("offset5", head.offset5.weight),
                        ("reg_fc", head.reg_fc.weight),
                        ("backbone p3", model.backbone.fpn.layer_blocks[1][0].weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # the T-head side is the (detached) target; the refinement guidance is detached too
    assert all(p.grad is None for p in model.t_head.parameters())
    assert all(p.grad is None for p in model.refine.parameters())


@pytest.mark.parametrize("path", ["cls", "reg"])
def test_each_mimic_path_trains_its_own_branch(path: str) -> None:
    model = tiny(mimic_paths=(path,))
    images, targets = batch()
    model(images, targets)["mimic"].backward()
    head = model.s_head
    cls_grad = head.cls_tower[0].weight.grad
    reg_grad = head.reg_tower[0].weight.grad
    if path == "cls":
        assert reg_grad is None and cls_grad.abs().sum() > 0
    else:  # the cls branch is in the graph only through a zero-weighted start value
        assert (cls_grad is None or cls_grad.abs().sum() == 0) and reg_grad.abs().sum() > 0


def test_mimic_weight_scales_the_mimic_term() -> None:
    images, targets = batch()
    full, quarter = tiny(mimic_weight=1.0), tiny(mimic_weight=0.25)  # same seed: same weights
    torch.manual_seed(5)  # same RoI and mimic samples
    one = full(images, targets)["mimic"]
    torch.manual_seed(5)
    torch.testing.assert_close(quarter(images, targets)["mimic"], 0.25 * one)


# -------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize(
    "options,keys",
    [
        ({}, LOSS_KEYS),
        ({"s_cls_loss": "sigmoid", "similarity": "l2", "staggered": False}, LOSS_KEYS),
        ({"t_head": False}, {"refine_cls", "refine_reg", "s_cls", "s_reg"}),
        ({"mimic_paths": ()}, LOSS_KEYS - {"mimic"}),
    ],
)
def test_train_losses_finite_and_every_parameter_trains(options: dict, keys: set[str]) -> None:
    model = tiny(**options)
    images, targets = batch()
    losses = model(images, targets)
    assert set(losses) == keys
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP-friendly: no unused parameters
    if options.get("t_head") is False:
        assert model.t_head is None and not model.backbone.with_p2


def test_images_without_boxes_train_the_background_only() -> None:
    """Without a box in the batch nothing is positive: the regression losses are exactly 0 and
    train no box regressor, while the classifiers still learn the background."""
    model = tiny(t_head=False)
    images, _ = batch()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(images, [dict(empty), dict(empty)])
    assert losses["refine_reg"].item() == 0.0 and losses["s_reg"].item() == 0.0
    assert losses["refine_cls"].item() > 0 and losses["s_cls"].item() > 0
    sum(losses.values()).backward()
    assert model.s_head.bbox_reg.weight.grad.abs().sum() == 0
    assert model.s_head.cls_logits.weight.grad.abs().sum() > 0
    one = model(images, [batch()[1][0], dict(empty)])  # one image with boxes: the batch still trains
    assert one["s_reg"].item() > 0


def test_train_mode_needs_targets_and_options_are_checked() -> None:
    images, _ = batch()
    with pytest.raises(ValueError):
        tiny()(images)
    for bad in ({"similarity": "kl"}, {"mimic_paths": ("box",)}, {"s_cls_loss": "focal"}):
        with pytest.raises(ValueError):
            tiny(**bad)
    with pytest.raises(ValueError):
        build_mimicdet("mobilenet_v3_small", K)


# ------------------------------------------------------------------------------------ inference
def test_eval_returns_detections_in_image_coordinates() -> None:
    model = tiny(score_thresh=0.0, neg_filter=0.0)
    model.eval()
    images, _ = batch()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == len(images)
    for det, (h, w) in zip(detections, SIZES):
        n = det["boxes"].shape[0]
        assert 0 < n <= model.detections_per_img
        assert det["scores"].shape == (n,) and det["labels"].shape == (n,)
        assert det["labels"].min() >= 1 and det["labels"].max() <= K
        boxes = det["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
    # the same detections in the transformed (resized) frame, mapped back by the resize ratios
    with torch.no_grad():
        image_list, _ = model.transform(images)
        internal = model.postprocess(model.dense(list(model.backbone(image_list.tensors).values())),
                                     image_list.image_sizes)
    assert image_list.image_sizes[0] == (118, 160)  # 97x131 resized by 160/131 (128x128 is not)
    for det, inner, (h, w), (nh, nw) in zip(detections, internal, SIZES, image_list.image_sizes):
        ratio = torch.tensor([w / nw, h / nh, w / nw, h / nh])
        torch.testing.assert_close(det["boxes"], inner["boxes"] * ratio)
        torch.testing.assert_close(det["scores"], inner["scores"])


def test_kdsweep_level_names_and_feature_tap_see_p3_to_p7() -> None:
    model = tiny()
    assert level_names(model) == {f"p{k}": f"p{k}" for k in range(3, 8)}
    assert level_strides(model) == {f"p{k}": 2**k for k in range(3, 8)}
    assert model.backbone.out_channels == C
    images, targets = batch()
    with FeatureTap(model, levels=("p3", "p7")) as tap:  # training mode: P2 stays out of the dict
        model(images, targets)
    assert set(tap.pop()) == {"p3", "p7"}


def test_the_regression_mimic_shapes_the_feature_the_s_head_predicts_from() -> None:
    """MimicDet mimics "the 1024-d feature" of the regression path: the S-head's own, the one its
    box deltas come from. So every S-head weight the reg-path mimic trains also runs at inference
    (no training-only projection that could absorb the mimic), and the deltas are a per-anchor
    linear map of the mimicked feature."""
    model = tiny(mimic_paths=("reg",))
    images, targets = batch()
    model(images, targets)["mimic"].backward()
    trained = {name for name, p in model.s_head.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"reg_fc.weight", "bbox_reg.weight"} & trained == {"reg_fc.weight"}  # the feature, upstream of the deltas
    ran: set[str] = set()
    named = {m: n for n, m in model.s_head.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda mod, args: ran.add(named[mod])) for m in named]
    model.eval()
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    assert {name.rsplit(".", 1)[0] for name in trained} <= ran  # all of it runs at inference
    feats = [torch.randn(1, C, 4, 4)] * 5
    guides = [torch.zeros(1, 4 * model.num_anchors, 4, 4)] * 5
    with torch.no_grad():
        _, reg, reg_feats = model.s_head(feats, guides)
        torch.testing.assert_close(reg[0], model.s_head.bbox_reg(reg_feats[0]))
    assert reg_feats[0].shape[1] == model.num_anchors * model.t_hidden


def test_the_no_mimic_control_trains_the_t_head_and_mimics_nothing() -> None:
    """The "T-head trained without mimic" row (``mimic_paths: []``): the T-head's own loss reaches
    the shared backbone, there is no mimic term, so the row separates the mimic's effect from the
    extra supervision's."""
    model = tiny(mimic_paths=())
    images, targets = batch()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS - {"mimic"}
    (losses["t_cls"] + losses["t_reg"]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.t_head.parameters())
    assert model.backbone.fpn.layer_blocks[1][0].weight.grad.abs().sum() > 0  # the shared backbone learns from it

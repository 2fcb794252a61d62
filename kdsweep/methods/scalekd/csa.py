r"""ScaleKD's cross-scale assistant (CSA): multi-scale cross-attention, its head and the KD losses.

Reference:
    Zhu et al., "ScaleKD: Distilling Scale-Aware Knowledge in Small Object Detector", CVPR 2023.
    The teacher sees a high-resolution input. Instead of distilling the student from the raw
    teacher predictions, an *assistant* attends from the student's FPN features (queries,
    values) to the teacher's (keys), predicts boxes through classification and regression
    branches (the student's shared head by default, or its own; supervised by the ground truth)
    and serves as the student's distillation target:

    .. math::
        L = L_{det} + \alpha L_{feat} + \beta L_{cls} + \gamma L_{bbox}

    ``L_feat`` (scale-decoupled features) lives elsewhere; this module gives the assistant
    (:class:`MultiScaleCrossAttention`, :class:`CSAHead`, :class:`CrossScaleAssistant`) and
    ``L_cls``, ``L_bbox`` (:func:`csa_distill_losses`).

Gradient flow (the caller's job, see :class:`CrossScaleAssistant`):

* the assistant's ground-truth loss uses **detached** student features, so it trains only the
  assistant's parameters;
* the assistant's outputs are **detached** as the student's targets
  (:func:`csa_distill_losses` does this itself), so ``L_cls``/``L_bbox`` train only the student.

The per-head downsampling ratios ``r_i`` are not given by the sources; they are a parameter
(default ``(1, 2, 4, 8)``).

Two readings of the write-up (seed 000), each an option, the paper's equations the default:

* **Which features give Q, K and V** (``query``). The equations: "Q_i = F_S W_i^Q,
  K_i = MSC(F_T, r_i) W_i^K, V_i = MSC(F_S, r_i) W_i^V" (queries and values from the student,
  keys from the teacher): ``query="student"``, the default. The prose just before them: "F_T is
  projected to the queries (Q) and keys (K), F_S to the values (V)": ``query="teacher"`` (the
  teacher map resized to the student's grid, so the output stays on it).
* **Whose head the assistant predicts with** (``head``). "Besides the distillation and detection
  losses that optimise the student detector, we also supervise [the CSA] through a *shared
  detection head*, further ensuring the quality of the instructive representation and its
  consistency with the student's representation": the student's own head on the attended
  features, ``head="student"``, the default (the consistency with the student's representation
  is what a head shared with the student gives). Its weights are detached there: the assistant's
  ground-truth loss trains the attention only, and the student's head keeps the student's own
  losses. "The learnable weights of CSA are updated through two independent classification and
  regression branches supervised by the ground truth" also reads as a head of its own:
  ``head="own"`` (a RetinaNet or FCOS head with ``num_convs`` blocks, trained with the attention).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead

from kdsweep.config import ConfigError
from kdsweep.models.detectors import fcos_head

__all__ = [
    "CSAHead", "CrossScaleAssistant", "MultiScaleCrossAttention", "anchor_matches", "csa_distill_losses", "pad_to_multiple",
]

_WHERE = "kd.csa.params"
"""Config path named by the error messages."""

QUERIES = ("student", "teacher")
"""Where the queries come from (the module docstring's first reading)."""
HEADS = ("own", "student")
"""Whose head predicts from the attended features (the module docstring's second reading)."""


def pad_to_multiple(x: Tensor, ratio: int) -> Tensor:
    r"""Replicate-pad the bottom/right of ``x`` so that ``H`` and ``W`` are multiples of ``ratio``.

    After this a ``ratio x ratio`` window with stride ``ratio`` gives
    :math:`\lceil H / r \rceil \times \lceil W / r \rceil` tokens: odd sizes keep their last
    partial window, and a map smaller than ``r`` collapses to one token. Replicating the edge
    (rather than zeros) keeps a partial window's mean equal to an edge-extended map's.

    Shape:
        - x: ``(N, C, H, W)``.
        - output: ``(N, C, r * ceil(H / r), r * ceil(W / r))`` (``x`` itself when already so).
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % ratio, -w % ratio
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


class _Aggregate(nn.Module):
    r"""The token aggregation of MSC at ratio ``r``: a depthwise ``r x r`` conv with stride ``r``.

    Initialised as average pooling (weights :math:`1 / r^2`, bias 0), then learned. ``r = 1`` is
    the identity (no parameters). The pointwise linear of MSC is the key/value projection that
    follows (see :class:`MultiScaleCrossAttention`).
    """

    def __init__(self, channels: int, ratio: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.conv: nn.Conv2d | None = None
        if ratio > 1:
            self.conv = nn.Conv2d(channels, channels, kernel_size=ratio, stride=ratio, groups=channels)
            nn.init.constant_(self.conv.weight, 1.0 / ratio**2)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return x
        return self.conv(pad_to_multiple(x, self.ratio))

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"


class _ScaleBranch(nn.Module):
    """Keys and values of one head group (one ratio): aggregation, projection, local term."""

    def __init__(self, dim: int, key_dim: int, out_dim: int, ratio: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.key_agg = _Aggregate(key_dim, ratio)
        self.key_proj = nn.Conv2d(key_dim, out_dim, kernel_size=1)
        self.value_agg = _Aggregate(dim, ratio)
        self.value_proj = nn.Conv2d(dim, out_dim, kernel_size=1)
        self.value_local = nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, groups=out_dim)

    def forward(self, key_map: Tensor, value_map: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, out_dim, h_r, w_r)`` keys and values (``V + P(V)``) on the same token grid."""
        k = self.key_proj(self.key_agg(key_map))
        v = self.value_proj(self.value_agg(value_map))
        return k, v + self.value_local(v)


class MultiScaleCrossAttention(nn.Module):
    r"""Multi-scale cross-attention of ScaleKD's assistant: student (or teacher) queries, teacher keys, student values.

    The ``num_heads`` heads (head width :math:`d = C / \text{num\_heads}`) are split evenly into
    ``len(ratios)`` groups; group ``i`` sees keys and values aggregated at ratio ``r_i``:

    .. math::
        Q &= W^Q X_q, \qquad
        K_i = W^K_i\, \mathrm{MSC}(\tilde T, r_i), \qquad
        V_i = W^V_i\, \mathrm{MSC}(S_v, r_i) + P_i\big(W^V_i\, \mathrm{MSC}(S_v, r_i)\big), \\
        O_h &= \operatorname{softmax}\!\big(Q_h K_h^\top / \sqrt{d}\big) V_h
            \quad (h \text{ a head of group } i), \qquad
        \text{out} = S_v + W^O [O_1; \dots; O_{\text{num\_heads}}]

    * ``W^Q``, ``W^K_i``, ``W^V_i``, ``W^O`` are 1x1 convolutions (per-token linears, with bias).
    * :math:`X_q` is the student map :math:`S_v` (the paper's equations, default) or, with
      ``query_dim`` set to the teacher's channels, the teacher's map resized like :math:`\tilde T`
      (the write-up's prose reading; see the module docstring).
    * :math:`\tilde T` is the teacher's key map resized to the student's ``(H, W)`` by adaptive
      average pooling (a 2x teacher: the mean of each 2x2 block), so that keys and values of a
      group are on one token grid. A teacher map already of size ``(H, W)`` is used as is.
    * :math:`\mathrm{MSC}(X, r)`: identity for ``r = 1``; for ``r > 1`` a depthwise ``r x r``
      convolution with stride ``r`` (initialised as average pooling) on the bottom/right
      replicate-padded map (:func:`pad_to_multiple`), giving
      :math:`\lceil H/r \rceil \lceil W/r \rceil` tokens (odd sizes work; a map smaller than
      ``r`` becomes one token). The pointwise linear of MSC is ``W^K_i`` / ``W^V_i``.
      Depthwise strided conv rather than pooling: learnable at ``C`` extra weights per ratio,
      and a full strided conv (Shunted Transformer) would cost ``C^2 r^2``.
    * ``P_i``: depthwise 3x3 convolution (zero padding 1) on the 2-D aggregated value map.
    * The residual keeps the student's features: the attention adds teacher-guided context.
    * Dropout (``dropout``) acts on the attention weights, in training mode only.

    Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` (default
    scale :math:`1/\sqrt{d}`), one call per head group.

    Args:
        dim: student channels ``C`` (queries, values, output).
        key_dim: teacher channels ``C_t`` (keys).
        num_heads: attention heads; ``C`` must be a multiple of it.
        ratios: one downsampling ratio per head group (integers >= 1); ``num_heads`` must be a
            multiple of ``len(ratios)``.
        dropout: attention dropout probability in ``[0, 1)``.
        query_dim: channels of the query map (default ``dim``: student queries).

    Raises:
        ConfigError: bad ``dim``/``key_dim``/``num_heads``/``ratios``/``dropout`` (one line).

    Shape:
        - query_map: ``(N, C_q, H_q, W_q)`` (student ``(N, C, H, W)``, or teacher, any size).
        - key_map: ``(N, C_t, H_k, W_k)`` (teacher; any size, e.g. ``(2H, 2W)``).
        - value_map: ``(N, C, H, W)`` (student).
        - output: ``(N, C, H, W)``.

    Reference:
        Zhu et al., "ScaleKD: Distilling Scale-Aware Knowledge in Small Object Detector",
        CVPR 2023 (cross-scale assistant); MSC and the local value term follow Ren et al.,
        "Shunted Self-Attention via Multi-Scale Token Aggregation", CVPR 2022.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        ratios: Sequence[int],
        dropout: float = 0.0,
        query_dim: int | None = None,
    ) -> None:
        super().__init__()
        ratios = _check_attention(dim, key_dim, num_heads, ratios, dropout)
        self.dim = dim
        self.query_dim = dim if query_dim is None else query_dim
        self.key_dim = key_dim
        self.num_heads = num_heads
        self.ratios = ratios
        self.dropout = float(dropout)
        self.head_dim = dim // num_heads
        self.heads_per_group = num_heads // len(ratios)
        group_dim = self.heads_per_group * self.head_dim
        self.q_proj = nn.Conv2d(self.query_dim, dim, kernel_size=1)
        self.branches = nn.ModuleList(_ScaleBranch(dim, key_dim, group_dim, r) for r in ratios)
        self.out_proj = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, query_map: Tensor, key_map: Tensor, value_map: Tensor) -> Tensor:
        """``query_map`` is the student's (default) or, with ``query_dim`` the teacher's channels,
        the teacher's (resized to the value map's grid); the output is on the value map's grid and
        its residual is the value map (the student's features)."""
        n, c, h, w = value_map.shape
        if c != self.dim:
            raise ValueError(f"csa attention: value map {tuple(value_map.shape)} must be (N, {self.dim}, H, W)")
        if query_map.dim() != 4 or query_map.shape[:2] != (n, self.query_dim):
            raise ValueError(f"csa attention: query map {tuple(query_map.shape)} must be (N={n}, {self.query_dim}, H_q, W_q)")
        if key_map.dim() != 4 or key_map.shape[0] != n or key_map.shape[1] != self.key_dim:
            raise ValueError(f"csa attention: key map {tuple(key_map.shape)} must be (N={n}, {self.key_dim}, H_k, W_k)")
        if key_map.shape[-2:] != (h, w):
            key_map = F.adaptive_avg_pool2d(key_map, (h, w))
        if query_map.shape[-2:] != (h, w):
            query_map = F.adaptive_avg_pool2d(query_map, (h, w))
        key_map = key_map.to(value_map.dtype)
        query_map = query_map.to(value_map.dtype)

        g, d = self.heads_per_group, self.head_dim
        q = self.q_proj(query_map).reshape(n, self.num_heads, d, h * w).transpose(-1, -2)  # (N, heads, HW, d)
        p = self.dropout if self.training else 0.0
        outs = []
        for i, branch in enumerate(self.branches):
            k, v = branch(key_map, value_map)  # (N, g*d, h_r, w_r)
            k = k.flatten(2).reshape(n, g, d, -1).transpose(-1, -2)  # (N, g, L_r, d)
            v = v.flatten(2).reshape(n, g, d, -1).transpose(-1, -2)
            outs.append(F.scaled_dot_product_attention(q[:, i * g : (i + 1) * g], k, v, dropout_p=p))
        o = torch.cat(outs, dim=1).transpose(-1, -2).reshape(n, c, h, w)
        return value_map + self.out_proj(o)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, query_dim={self.query_dim}, key_dim={self.key_dim}, num_heads={self.num_heads}, "
                f"ratios={self.ratios}, dropout={self.dropout}")


class CSAHead(RetinaNetHead):
    r"""The assistant's classification and regression branches: a torchvision ``RetinaNetHead``.

    A subclass of :class:`torchvision.models.detection.retinanet.RetinaNetHead` whose two conv
    towers keep their first ``num_convs`` 3x3 conv(-norm)-ReLU blocks (torchvision has 4). All
    else is torchvision's: the output ordering (per level ``(N, A*K, H, W)`` viewed as
    ``(N, A, K, H, W)``, permuted to ``(N, H, W, A, K)``, reshaped to ``(N, H*W*A, K)``, levels
    concatenated), the initialisation (cls prior 0.01) and ``compute_loss``. So the assistant's
    outputs can be supervised by the student RetinaNet's own ``head.compute_loss`` (same
    anchors, same matching), and with ``num_convs=4`` (and the same ``norm_layer``) the state dict
    is interchangeable with a RetinaNet head's, e.g. to start the assistant from the student's
    head.

    Args:
        in_channels: FPN channels ``C``.
        num_anchors: anchors per location ``A`` (the student's anchor generator).
        num_classes: classes ``K`` (as the student's head, background included if it has one).
        num_convs: conv blocks per tower, ``0..4``.
        norm_layer: as torchvision (``None``; RetinaNet v2 uses ``GroupNorm`` with 32 groups).

    Raises:
        ConfigError: a size < 1 or ``num_convs`` outside ``0..4``.

    Shape:
        - input: list of ``(N, C, H_l, W_l)``.
        - output: ``{"cls_logits": (N, sum_l H_l W_l A, K), "bbox_regression": (N, sum_l H_l W_l A, 4)}``.

    Reference:
        Zhu et al., "ScaleKD", CVPR 2023 (the assistant's own detection branches); Lin et al.,
        "Focal Loss for Dense Object Detection", ICCV 2017 (the head).
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 2,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        if min(in_channels, num_anchors, num_classes) < 1:
            raise ConfigError(
                f"kd.csa: in_channels, num_anchors and num_classes must be >= 1, got {in_channels}, "
                f"{num_anchors}, {num_classes}"
            )
        if not 0 <= num_convs <= 4:
            raise ConfigError(f"{_WHERE}.num_convs {num_convs} must be in 0..4")
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.num_convs = num_convs
        for tower in (self.classification_head, self.regression_head):
            tower.conv = nn.Sequential(*list(tower.conv)[:num_convs])


class CrossScaleAssistant(nn.Module):
    r"""ScaleKD's cross-scale assistant: per-level cross-attention to the teacher, one shared head.

    .. math::
        F_l = \mathrm{MSCA}_l(S_l, T_l, S_l), \qquad
        (\text{cls\_logits}, \text{bbox\_regression}) = \mathrm{Head}(F_1, \dots, F_L)

    with one :class:`MultiScaleCrossAttention` per pyramid level (queries and values from the
    student level ``S_l``, keys from the teacher level ``T_l``, which may be of higher
    resolution; ``query="teacher"``: :math:`\mathrm{MSCA}_l(T_l, T_l, S_l)`) and one
    :class:`CSAHead` shared by all levels, like a RetinaNet head (``own_head=False``: no head
    here; the caller applies the student's, see :class:`~kdsweep.methods.scalekd.terms.CSATerm`).

    Training (the caller's side):

    * Ground-truth loss: pass **detached** student levels, ``assistant([s.detach() for s in S], T)``,
      and supervise the output with the student detector's ``head.compute_loss`` (same anchors
      and matching): this trains only the assistant's parameters.
    * Distillation: the assistant's outputs are **detached** when they serve as the student's
      targets (:func:`csa_distill_losses` detaches them), so ``L_cls``/``L_bbox`` train only the
      student. The same forward pass can serve both.
    * The teacher levels are detached here (the teacher is never trained).

    Args:
        student_channels: student FPN channels ``C``.
        teacher_channels: teacher FPN channels ``C_t``.
        num_levels: pyramid levels ``L``.
        num_anchors, num_classes: as the student's head (``A``, ``K``).
        num_heads, ratios, dropout: of each :class:`MultiScaleCrossAttention`.
        num_convs, norm_layer: of the :class:`CSAHead`.
        query: ``student`` (the paper's equations, default) or ``teacher`` (see the module docstring).
        own_head: build the assistant's own head (``head: own``; the default ``head: student`` of
            :class:`~kdsweep.methods.scalekd.terms.CSATerm` builds none):
            a :class:`CSAHead` for a RetinaNet student, torchvision's FCOS head with ``num_convs``
            blocks (:func:`~kdsweep.models.detectors.fcos_head`) for ``detector="fcos"``.
        detector: the student's kind, ``retinanet`` or ``fcos``: the assistant predicts in its
            format, so the student's ``compute_loss`` supervises it and its outputs distil it.

    Raises:
        ConfigError: bad sizes, heads or ratios (one line).

    Shape:
        - student_levels: ``L`` tensors ``(N, C, H_l, W_l)``.
        - teacher_levels: ``L`` tensors ``(N, C_t, H'_l, W'_l)`` (any size, e.g. ``2H_l x 2W_l``).
        - output: as :class:`CSAHead`, anchors in the student's order.

    Reference:
        Zhu et al., "ScaleKD: Distilling Scale-Aware Knowledge in Small Object Detector", CVPR 2023.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_levels: int,
        num_anchors: int,
        num_classes: int,
        num_heads: int = 4,
        ratios: Sequence[int] = (1, 2, 4, 8),
        *,
        dropout: float = 0.0,
        num_convs: int = 2,
        norm_layer: Callable[..., nn.Module] | None = None,
        query: str = "student",
        own_head: bool = True,
        detector: str = "retinanet",
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ConfigError(f"kd.csa: num_levels must be >= 1, got {num_levels}")
        if query not in QUERIES:
            raise ConfigError(f"{_WHERE}.query '{query}' is unknown; use student (the paper's equations) or teacher")
        self.num_levels = num_levels
        self.query = query
        query_dim = teacher_channels if query == "teacher" else student_channels
        self.attention = nn.ModuleList(
            MultiScaleCrossAttention(student_channels, teacher_channels, num_heads, ratios, dropout, query_dim=query_dim)
            for _ in range(num_levels)
        )
        self.head: nn.Module | None = None
        if own_head and detector == "fcos":  # FCOS's own head (classification, ltrb regression, centerness)
            self.head = fcos_head(student_channels, num_classes, num_convs=num_convs)
        elif own_head:
            self.head = CSAHead(student_channels, num_anchors, num_classes, num_convs=num_convs, norm_layer=norm_layer)

    def features(self, student_levels: Sequence[Tensor], teacher_levels: Sequence[Tensor]) -> list[Tensor]:
        """The attended per-level features ``F_l`` (``(N, C, H_l, W_l)`` each)."""
        if len(student_levels) != self.num_levels or len(teacher_levels) != self.num_levels:
            raise ValueError(
                f"csa: expected {self.num_levels} levels, got {len(student_levels)} student and "
                f"{len(teacher_levels)} teacher feature maps"
            )
        if self.query == "teacher":
            return [attn(t.detach(), t.detach(), s) for attn, s, t in zip(self.attention, student_levels, teacher_levels)]
        return [attn(s, t.detach(), s) for attn, s, t in zip(self.attention, student_levels, teacher_levels)]

    def forward(self, student_levels: Sequence[Tensor], teacher_levels: Sequence[Tensor]) -> dict[str, Tensor]:
        if self.head is None:
            raise RuntimeError("csa: this assistant has no head of its own (head: student); apply the student's to features()")
        return self.head(self.features(student_levels, teacher_levels))


class _MatchRecorder:
    """Stands in for a dense head: its ``compute_loss`` keeps the anchor matching it is handed."""

    def __init__(self) -> None:
        self.matched: list[Tensor] | None = None

    def compute_loss(self, targets: object, head_outputs: object, anchors: object, matched_idxs: list[Tensor]) -> dict:
        self.matched = matched_idxs
        return {}


class _MatchingView:
    """A detector seen through its own ``compute_loss`` with the head replaced by a recorder."""

    def __init__(self, detector: nn.Module, head: _MatchRecorder) -> None:
        self._detector, self.head = detector, head

    def __getattr__(self, name: str) -> object:  # everything but ``head``: the detector's own
        return getattr(self._detector, name)


def anchor_matches(
    detector: nn.Module,
    targets: Sequence[dict[str, Tensor]],
    anchors: Sequence[Tensor],
    num_anchors_per_level: Sequence[int] | None = None,
) -> list[Tensor]:
    r"""Torchvision's own anchor-to-ground-truth matching of a RetinaNet or FCOS ``detector``.

    Runs the detector class's ``compute_loss`` with its head replaced by a recorder, so the
    matching is torchvision's code itself (RetinaNet: ``proposal_matcher`` on the IoU, ignored
    anchors ``-2``; FCOS: centre sampling and scale ranges), not a copy of it.

    Shape:
        - targets: per image ``boxes`` ``(n, 4)`` xyxy, ``labels`` ``(n,)``.
        - anchors: per image ``(A, 4)``; ``num_anchors_per_level``: FCOS's points per level.
        - output: per image ``(A,)`` int64: the matched box's index, ``< 0`` for background
          (``-1``) and RetinaNet's between-threshold anchors (``-2``).
    """
    recorder = _MatchRecorder()
    view = _MatchingView(detector, recorder)
    if isinstance(detector, FCOS):
        if num_anchors_per_level is None:
            raise ValueError("csa: FCOS's matching needs num_anchors_per_level")
        type(detector).compute_loss(view, list(targets), {}, list(anchors), list(num_anchors_per_level))
    elif isinstance(detector, RetinaNet):
        type(detector).compute_loss(view, list(targets), {}, list(anchors))
    else:
        raise TypeError(f"csa: anchor matching needs a RetinaNet or FCOS student, got {type(detector).__name__}")
    assert recorder.matched is not None
    return recorder.matched


def csa_distill_losses(
    student_head: dict[str, Tensor],
    csa_head: dict[str, Tensor],
    foreground: Tensor,
    *,
    per_image: bool = True,
    temperature: float = 1.0,
    beta: float = 0.0,
) -> tuple[Tensor, Tensor]:
    r"""ScaleKD's ``L_cls`` and ``L_bbox``: the student's dense head distilled from the assistant's.

    With student logits ``s``, assistant logits ``c`` (per anchor ``a`` and class ``k``,
    per-class sigmoid as in RetinaNet/FCOS), temperature ``T``, student and assistant box
    deltas ``b``, ``\hat b``, and ``F`` the foreground (positive) anchors of the student's own
    ground-truth matching (:func:`anchor_matches`), per image ``n``:

    .. math::
        p_{ak} = \sigma(c_{ak} / T), \qquad
        L_{cls} = \frac{\sum_{a,k} \mathrm{BCE}\big(\sigma(s_{ak} / T), p_{ak}\big)}{\max(1, |F|)}, \qquad
        L_{bbox} = \frac{\sum_{a \in F} \sum_{j=1}^{4} \ell_\beta(b_{aj} - \hat b_{aj})}{\max(1, |F|)}

    **The normaliser is our reading; the paper gives none.** Its weights ``(beta, gamma)`` sit
    next to ``L_det`` in ``L = L_det + alpha L_feat + beta L_cls + gamma L_bbox``, so both losses
    are normalised as the student's own detection loss is (torchvision's ``retinanet.py`` /
    ``fcos.py``): summed over anchors (``L_cls``: every anchor and class, as the assistant has a
    soft target everywhere; ``L_bbox``: the positive anchors, as the detection regression loss) and
    divided by the number of positive anchors, :math:`\max(1, |F|)`. ``per_image=True``
    (RetinaNet): per image, then the mean over images; ``False`` (FCOS): over the batch. (Until
    issue 24 ``L_cls`` was a mean over all ``N A K`` entries, ~600x weaker on the student's logits
    at the quick preset, ~1e5x at COCO scale, and ``L_bbox`` was normalised by the assistant's
    confidence summed over every anchor, which background dominates.)

    Both logits are divided by ``T``, so the minimum of ``L_cls`` is at ``s = c`` for every
    ``T``; its value there is the entropy of ``p`` over ``|F|`` (not 0). No ``T^2`` factor: the
    loss weight absorbs it. ``\ell_\beta`` is smooth-L1
    (:func:`torch.nn.functional.smooth_l1_loss`), summed over the 4 coordinates as torchvision's
    RetinaNet L1; the default ``beta = 0`` is plain L1. The assistant tensors are detached here.

    Args:
        student_head: the student head's ``{"cls_logits", "bbox_regression"}``.
        csa_head: the assistant's, same shapes (same anchors in the same order).
        foreground: ``(N, A)`` bool, the positive anchors (``matched_idxs >= 0``).
        per_image: normalise per image then average (RetinaNet) or over the batch (FCOS).
        temperature: ``T > 0``.
        beta: smooth-L1 threshold ``>= 0`` (``0``: L1).

    Returns:
        ``(L_cls, L_bbox)``, scalars; gradients reach only the student tensors.

    Raises:
        ConfigError: ``temperature <= 0`` or ``beta < 0``.
        ValueError: shapes differ or are not ``(N, A, K)`` / ``(N, A, 4)`` / ``(N, A)``.

    Shape:
        - cls_logits: ``(N, A, K)``; bbox_regression: ``(N, A, 4)``; foreground: ``(N, A)``.
        - outputs: ``()``, ``()``.

    Reference:
        Zhu et al., "ScaleKD: Distilling Scale-Aware Knowledge in Small Object Detector",
        CVPR 2023 (the student distilled from the assistant's outputs); Lin et al., "Focal Loss
        for Dense Object Detection", ICCV 2017 (normalised by the number of positive anchors).
    """
    if not temperature > 0 or not math.isfinite(temperature):
        raise ConfigError(f"{_WHERE}.temperature {temperature} must be a finite number > 0")
    if not beta >= 0:
        raise ConfigError(f"{_WHERE}.beta {beta} must be >= 0 (0: L1)")
    s_cls, s_box = student_head["cls_logits"], student_head["bbox_regression"]
    c_cls, c_box = csa_head["cls_logits"].detach(), csa_head["bbox_regression"].detach()
    if s_cls.dim() != 3 or s_cls.shape != c_cls.shape:
        raise ValueError(f"csa: cls_logits must be equal (N, A, K): student {tuple(s_cls.shape)}, csa {tuple(c_cls.shape)}")
    if s_box.shape != c_box.shape or s_box.shape != (*s_cls.shape[:2], 4):
        raise ValueError(
            f"csa: bbox_regression must be equal (N, A, 4) with A = {s_cls.shape[1]}: student "
            f"{tuple(s_box.shape)}, csa {tuple(c_box.shape)}"
        )
    if foreground.shape != s_cls.shape[:2] or foreground.dtype != torch.bool:
        raise ValueError(f"csa: foreground must be a bool (N, A) = {tuple(s_cls.shape[:2])} mask, got "
                         f"{foreground.dtype} {tuple(foreground.shape)}")
    c_cls, c_box = c_cls.to(s_cls.dtype), c_box.to(s_box.dtype)
    target = torch.sigmoid(c_cls / temperature)
    cls_sum = F.binary_cross_entropy_with_logits(s_cls / temperature, target, reduction="none").sum(dim=(1, 2))  # (N,)
    box = F.smooth_l1_loss(s_box, c_box, reduction="none", beta=beta).sum(dim=-1)  # (N, A)
    box_sum = torch.where(foreground, box, torch.zeros_like(box)).sum(dim=1)  # (N,)
    num_pos = foreground.sum(dim=1).to(s_cls.dtype)  # (N,)
    if per_image:
        norm = num_pos.clamp_min(1.0)
        return (cls_sum / norm).mean(), (box_sum / norm).mean()
    norm = num_pos.sum().clamp_min(1.0)
    return cls_sum.sum() / norm, box_sum.sum() / norm


def _check_attention(dim: int, key_dim: int, num_heads: int, ratios: Sequence[int], dropout: float) -> tuple[int, ...]:
    """Validate :class:`MultiScaleCrossAttention`'s arguments; return the ratios as a tuple."""
    if dim < 1 or key_dim < 1:
        raise ConfigError(f"kd.csa: student and teacher channels must be >= 1, got {dim}, {key_dim}")
    shown = list(ratios) if isinstance(ratios, Sequence) and not isinstance(ratios, str) else ratios
    if (
        not isinstance(ratios, Sequence)
        or isinstance(ratios, str)
        or not ratios
        or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ratios)
    ):
        raise ConfigError(f"{_WHERE}.ratios {shown!r}: give a non-empty list of integers >= 1")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ConfigError(f"{_WHERE}.num_heads {num_heads!r} must be an integer >= 1")
    if num_heads % len(ratios):
        raise ConfigError(f"{_WHERE}.ratios {shown}: num_heads {num_heads} must be a multiple of the number of ratios")
    if dim % num_heads:
        raise ConfigError(f"{_WHERE}.num_heads {num_heads}: student channels {dim} must be a multiple of num_heads")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{_WHERE}.dropout {dropout} must be in [0, 1)")
    return tuple(int(r) for r in ratios)

"""Structural (SSIM) feature distillation loss.

Reference:
    de Rijk & Schneider, "Structural Knowledge Distillation for Object Detection", NeurIPS 2022.
    The student's FPN features are compared with the teacher's by ``1 - SSIM`` instead of an
    Lp distance, so the loss rewards matching local mean (luminance), local spread (contrast)
    and local correlation (structure) of the feature maps.

Conventions (shared by every function here):

* Local statistics use a Gaussian window with "valid" filtering, exactly as ``pytorch_msssim``:
  an ``(H, W)`` map gives an ``(H - k + 1, W - k + 1)`` SSIM map for a window of ``k`` taps,
  and the variances are the biased ``E[x^2] - E[x]^2``.
* The data range is ``L = 1``: ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, ``C3 = C2 / 2``.
* Small maps (FPN P6/P7 of small images): the window shrinks to
  ``k = min(window_size, largest odd number <= min(H, W))`` and ``sigma`` shrinks in proportion,
  ``sigma * k / window_size`` (:func:`effective_window`). A 1x1 or 2x2 map gets ``k = 1``: every
  local variance is exactly 0 and SSIM degenerates to per-pixel luminance ``l`` (``c = 1``,
  ``s = 1`` up to ``VAR_EPS``); nothing divides by a variance, so there is no NaN.
* Powers: ``t^e`` is the sign-preserving, smoothed power ``t (t^2 + tau^2)^((e - 1) / 2)`` with
  ``tau = 1e-4`` (:func:`signed_power`). It is exactly ``t`` for ``e = 1``, the term is left out
  for ``e = 0``, and for any ``e > 0`` it is odd, increasing and has the finite slope
  ``tau^(e - 1)`` at 0: a negative structure term ``s`` (anti-correlated features) stays negative
  (``s^0.5`` of ``-0.25`` is ``-0.5``) and fractional exponents have finite gradients.
* ``beta == gamma``: ``c^beta s^gamma`` is evaluated as ``(c s)^beta`` with the exact identity
  ``c s = (2 s_xy + C2) / (s_x^2 + s_y^2 + C2)`` (because ``C3 = C2 / 2`` and ``c > 0``), which
  needs no square root. With ``alpha = beta = gamma = 1`` this is the standard SSIM ``l * cs``
  of ``pytorch_msssim``. When ``beta != gamma`` (e.g. structure only),
  ``s_x = sqrt(max(var_x, 0) + VAR_EPS)`` so that the gradient stays finite on flat regions.

Implementation: :func:`ssim_map` is the plain-autograd reference. :func:`ssim_feature_loss`
dispatches on the device: non-CPU tensors (CUDA, and ``meta`` in the preflight) take
:func:`_device_ssim_mean`, two depthwise convolutions over the stacked moments with autograd;
CPU tensors take a fused kernel (:class:`_FusedSSIM`) that returns the mean and computes its
gradient in the same pass (derived by hand, checked by ``gradcheck``). The separable Gaussian is applied as banded
matrix products (BLAS) to the stacked moments ``(x, y, x^2 + y^2, xy)``, chunk of planes by
chunk of planes so that the elementwise math stays in cache; on the CPU the chunks are shared out
to single-threaded workers (one per ``torch.get_num_threads()``) and their work memory is kept
between calls. See ``benchmarks/bench_ssim.py``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "SSIMLoss",
    "effective_window",
    "filter2d_valid",
    "gaussian_window",
    "minmax_normalize",
    "signed_power",
    "ssim_feature_loss",
    "ssim_map",
]

Normalize = Literal["minmax"] | None

POW_TAU = 1e-4
"""Smoothing of :func:`signed_power` at 0 (its slope there is ``tau^(e - 1)``)."""
VAR_EPS = 1e-8
"""Added to the clamped variances before the square root (only when ``beta != gamma``)."""
MINMAX_EPS = 1e-6
"""Added to the range in :func:`minmax_normalize`, so that a constant map gives zeros, not NaN."""

_CHUNK_ELEMS = 1 << 18
"""Input elements per plane chunk on the CPU (about 20 MB of float32 work memory per worker)."""
_PARALLEL_CHUNKS = True
"""Share the CPU chunks out to single-threaded workers (see :func:`_workers`)."""
_BLOCK_H = 16
"""Output rows per block of the banded products along H (``M^T @ X``)."""
_BLOCK_W = 32
"""Output columns per block of the banded products along W (``X @ M``)."""
_STANDARD_TEMPS = 5
"""Work maps of the ``alpha = beta = gamma = 1`` elementwise kernel."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def ssim_feature_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    normalize: Normalize = "minmax",
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    r"""Structural feature loss ``1 - mean(SSIM map)`` between one student/teacher feature pair.

    .. math::
        \text{SSIM} = l^\alpha c^\beta s^\gamma,\quad
        l = \frac{2\mu_x\mu_y + C_1}{\mu_x^2 + \mu_y^2 + C_1},\quad
        c = \frac{2\sigma_x\sigma_y + C_2}{\sigma_x^2 + \sigma_y^2 + C_2},\quad
        s = \frac{\sigma_{xy} + C_3}{\sigma_x\sigma_y + C_3}

    with Gaussian-weighted local statistics (``window_size`` taps, ``sigma``; "valid" filtering),
    ``C1 = k1^2``, ``C2 = k2^2``, ``C3 = C2 / 2`` (data range 1). The mean runs over all
    ``N * C * H' * W'`` map values. See the module docstring for small maps (the window shrinks),
    powers of negative terms (sign-preserving smoothed power) and ``beta == gamma``.

    Args:
        student: student features ``x``; gradients flow to it (and to what produced it).
        teacher: teacher features ``y``; normally detached (a gradient is computed only if it
            requires one).
        alpha, beta, gamma: exponents of luminance, contrast and structure (``>= 0``; 0 drops
            the term, not all 0). ``alpha = beta = 0`` is the paper's structure-only ablation.
        window_size, sigma: Gaussian window (odd size; shrunk on smaller maps).
        normalize: ``"minmax"``: each sample of each map is mapped to ``[0, 1]`` over
            ``(C, H, W)`` first (:func:`minmax_normalize`; the gradient through min/max goes to
            the first arg-min/arg-max, a subgradient where values tie); ``None``: used as is.
        k1, k2: SSIM stabilisers.

    Returns:
        Scalar loss, 0 for identical inputs (at most 2).

    Shape:
        - student, teacher: ``(N, C, H, W)``, any ``H, W >= 1``; float64 stays float64, other
          dtypes are computed in float32.
        - output: ``()``.

    Reference:
        de Rijk & Schneider, "Structural Knowledge Distillation for Object Detection", NeurIPS 2022.

    Example:
        >>> s, t = torch.rand(2, 8, 16, 16, requires_grad=True), torch.rand(2, 8, 16, 16)
        >>> ssim_feature_loss(s, t).backward()
    """
    spec = _check(student, teacher, alpha, beta, gamma, window_size, sigma, normalize, k1, k2)
    x, y = _as_float(student), _as_float(teacher)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    window = effective_window(x.shape[-2], x.shape[-1], window_size, sigma)
    if x.device.type != "cpu":  # CUDA (the paper preset), meta (the preflight), any other device
        return 1.0 - _device_ssim_mean(x, y, spec, window, normalize == "minmax")
    grad_on = torch.is_grad_enabled()
    need_x, need_y = grad_on and x.requires_grad, grad_on and y.requires_grad
    mean = _FusedSSIM.apply(x, y, spec, window, normalize == "minmax", need_x, need_y)
    return 1.0 - mean


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type without autocast (meta)
        return contextlib.nullcontext()


def _device_ssim_mean(x: Tensor, y: Tensor, spec: _Spec, window: tuple[int, float], normalize: bool) -> Tensor:
    """Mean SSIM map on any device: the five moments ``(x, y, x^2, y^2, xy)`` stacked along the
    channels, filtered by the separable Gaussian as two depthwise (grouped) convolutions, one per
    axis ("valid", as :func:`filter2d_valid`), then the map of :func:`ssim_map`; plain autograd.

    This is the path of non-CPU tensors (the CPU has the fused kernel, :class:`_FusedSSIM`): one
    cuDNN depthwise convolution per axis on GPUs, no host synchronisation, always in float32 or
    float64 (autocast is off inside).

    Shape:
        - x, y: ``(N, C, H, W)``, same dtype and device; output: ``()``.
    """
    with _autocast_off(x.device.type):
        if normalize:
            x, y = minmax_normalize(x), minmax_normalize(y)
        k, s = window
        channels = x.shape[1] * 5
        g = gaussian_window(k, s, dtype=x.dtype, device=x.device)
        z = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (N, 5C, H, W)
        z = torch.nn.functional.conv2d(z, g.view(1, 1, k, 1).expand(channels, 1, k, 1), groups=channels)
        z = torch.nn.functional.conv2d(z, g.view(1, 1, 1, k).expand(channels, 1, 1, k), groups=channels)
        mx, my, exx, eyy, exy = z.chunk(5, dim=1)
        return _ssim_from_moments(mx, my, exx, eyy, exy, spec).mean()


class SSIMLoss(nn.Module):
    """Module form of :func:`ssim_feature_loss`; only stores the arguments.

    Shape:
        - student, teacher: ``(N, C, H, W)``; output: ``()``.

    Reference:
        de Rijk & Schneider, "Structural Knowledge Distillation for Object Detection", NeurIPS 2022.
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        window_size: int = 11,
        sigma: float = 1.5,
        normalize: Normalize = "minmax",
        k1: float = 0.01,
        k2: float = 0.03,
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.window_size, self.sigma = window_size, sigma
        self.normalize: Normalize = normalize
        self.k1, self.k2 = k1, k2

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return ssim_feature_loss(
            student,
            teacher,
            alpha=self.alpha,
            beta=self.beta,
            gamma=self.gamma,
            window_size=self.window_size,
            sigma=self.sigma,
            normalize=self.normalize,
            k1=self.k1,
            k2=self.k2,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, window_size={self.window_size}, "
            f"sigma={self.sigma}, normalize={self.normalize!r}, k1={self.k1}, k2={self.k2}"
        )


def ssim_map(
    student: Tensor,
    teacher: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    normalize: Normalize = "minmax",
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    r"""Generalised SSIM map :math:`l^\alpha c^\beta s^\gamma` (plain autograd reference).

    Same math and arguments as :func:`ssim_feature_loss`, which equals ``1 - ssim_map(...).mean()``
    and is faster; use this to look at the map, or where double backward is needed.

    Shape:
        - student, teacher: ``(N, C, H, W)``
        - output: ``(N, C, H - k + 1, W - k + 1)`` with ``k`` from :func:`effective_window`.

    Reference:
        de Rijk & Schneider, "Structural Knowledge Distillation for Object Detection", NeurIPS 2022.
    """
    spec = _check(student, teacher, alpha, beta, gamma, window_size, sigma, normalize, k1, k2)
    x, y = _as_float(student), _as_float(teacher)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    if normalize == "minmax":
        x, y = minmax_normalize(x), minmax_normalize(y)
    m = [filter2d_valid(t, window_size, sigma) for t in (x, y, x * x, y * y, x * y)]
    return _ssim_from_moments(*m, spec)


def effective_window(height: int, width: int, window_size: int, sigma: float) -> tuple[int, float]:
    """Window ``(k, sigma_k)`` actually used on an ``(height, width)`` map.

    ``k = min(window_size, m)`` with ``m`` the largest odd number ``<= min(height, width)``, and
    ``sigma_k = sigma * k / window_size``: the Gaussian keeps its shape relative to the window.
    E.g. for 11 / 1.5: 16x16 -> (11, 1.5), 4x4 -> (3, 0.409), 2x2 and 1x1 -> (1, 0.136).
    """
    side = min(height, width)
    largest_odd = side if side % 2 == 1 else side - 1
    k = min(window_size, max(largest_odd, 1))
    return k, sigma * k / window_size


def gaussian_window(
    size: int, sigma: float, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """Normalised 1-D Gaussian ``g_i = exp(-(i - size // 2)^2 / (2 sigma^2)) / Z``.

    Same taps as ``pytorch_msssim``'s window.

    Shape:
        - output: ``(size,)``.
    """
    coords = torch.arange(size, dtype=torch.float64, device="cpu") - size // 2
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def filter2d_valid(x: Tensor, window_size: int, sigma: float) -> Tensor:
    """Valid separable Gaussian filtering with the window of :func:`effective_window` (autograd).

    ``out = M_h^T x M_w`` with the banded matrices ``M[a, o] = g[a - o]``, ``0 <= a - o < k``.

    Shape:
        - x: ``(N, C, H, W)``; output: ``(N, C, H - k + 1, W - k + 1)``.
    """
    k, s = effective_window(x.shape[-2], x.shape[-1], window_size, sigma)
    bh, _ = _gaussian_bands(x.shape[-2], k, s, x.dtype, x.device, _BLOCK_H)
    bw, _ = _gaussian_bands(x.shape[-1], k, s, x.dtype, x.device, _BLOCK_W)
    return bh.matrix.t() @ x @ bw.matrix


def signed_power(t: Tensor, exponent: float, tau: float = POW_TAU) -> Tensor:
    """Sign-preserving smoothed power ``t (t^2 + tau^2)^((e - 1) / 2)``.

    Equals ``t`` for ``e = 1`` and ``sign(t) |t|^e (1 + O(tau^2 / t^2))`` otherwise; ``e = 0`` gives
    1 (the SSIM term is left out). Odd and increasing in ``t`` for ``e > 0``; slope
    ``tau^(e - 1)`` at 0, so gradients stay finite for fractional ``e``.

    Shape:
        - t: any; output: same.
    """
    if exponent == 1.0:
        return t
    if exponent == 0.0:
        return torch.ones_like(t)
    return t * (t * t + tau * tau) ** ((exponent - 1.0) / 2.0)


def minmax_normalize(x: Tensor, eps: float = MINMAX_EPS) -> Tensor:
    """Min-max normalise each sample to ``[0, 1]`` over ``(C, H, W)``: ``(x - min) / (max - min + eps)``.

    Per sample rather than per (sample, channel): it keeps the relative scale of the channels,
    which is part of what the teacher knows (a channel it barely uses stays near 0), and it does
    not blow near-constant channels up to full range. The result is invariant to ``x -> a x + b``
    for ``a > 0`` (up to ``eps``); a constant map gives zeros.

    Shape:
        - x: ``(N, C, H, W)``; output: same.
    """
    flat = x.flatten(1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    scale = 1.0 / (hi - lo + eps)
    return x * scale[:, None, None, None] - (lo * scale)[:, None, None, None]


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """Constants of one SSIM evaluation."""

    alpha: float
    beta: float
    gamma: float
    c1: float
    c2: float

    @property
    def c3(self) -> float:
        return self.c2 / 2.0

    @property
    def joint_cs(self) -> bool:
        """``beta == gamma``: use ``(c s)^beta`` (no square roots)."""
        return self.beta == self.gamma


def _check(
    student: Tensor,
    teacher: Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    window_size: int,
    sigma: float,
    normalize: Normalize,
    k1: float,
    k2: float,
) -> _Spec:
    if student.dim() != 4 or student.shape != teacher.shape or student.numel() == 0:
        raise ValueError(
            "ssim: student and teacher must be non-empty (N, C, H, W) tensors of equal shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if min(alpha, beta, gamma) < 0 or max(alpha, beta, gamma) == 0:
        raise ValueError(f"ssim: exponents must be >= 0 and not all 0, got alpha={alpha} beta={beta} gamma={gamma}")
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"ssim: window_size must be a positive odd integer, got {window_size!r}")
    if sigma <= 0 or k1 <= 0 or k2 <= 0:
        raise ValueError(f"ssim: sigma, k1 and k2 must be > 0, got sigma={sigma} k1={k1} k2={k2}")
    if normalize not in ("minmax", None):
        raise ValueError(f"ssim: normalize must be 'minmax' or None, got {normalize!r}")
    return _Spec(float(alpha), float(beta), float(gamma), float(k1) ** 2, float(k2) ** 2)


def _as_float(t: Tensor) -> Tensor:
    """float32/float64 stay; half, bfloat16 and integers are computed in float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _ssim_from_moments(mx: Tensor, my: Tensor, exx: Tensor, eyy: Tensor, exy: Tensor, spec: _Spec) -> Tensor:
    """SSIM map ``l^alpha c^beta s^gamma`` from the filtered moments (readable reference)."""
    vx, vy, cxy = exx - mx * mx, eyy - my * my, exy - mx * my
    out = signed_power((2 * mx * my + spec.c1) / (mx * mx + my * my + spec.c1), spec.alpha)
    if spec.joint_cs:
        if spec.beta != 0.0:
            out = out * signed_power((2 * cxy + spec.c2) / (vx + vy + spec.c2), spec.beta)
        return out
    vx, vy = vx.clamp(min=0) + VAR_EPS, vy.clamp(min=0) + VAR_EPS
    sxy = torch.sqrt(vx) * torch.sqrt(vy)
    c = (2 * sxy + spec.c2) / (vx + vy + spec.c2)
    s = (cxy + spec.c3) / (sxy + spec.c3)
    return out * signed_power(c, spec.beta) * signed_power(s, spec.gamma)


# --------------------------------------------------------------------------------------------
# Banded Gaussian filtering as matrix products
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Band:
    """A banded matrix ``M`` of shape ``(n_in, n_out)`` and the blocks of its nonzero band.

    ``blocks`` lists ``(i, j, lo, hi)``: output columns ``i:j`` only read input rows ``lo:hi``.
    """

    matrix: Tensor
    blocks: tuple[tuple[int, int, int, int], ...]

    def right(self, x: Tensor, out: Tensor) -> _Plan:
        """Products for ``out = x @ M``, ``x`` of shape ``(rows, n_in)``, block by block."""
        return [(x[:, lo:hi], self.matrix[lo:hi, i:j], out[:, i:j]) for i, j, lo, hi in self.blocks]

    def left(self, x: Tensor, out: Tensor) -> _Plan:
        """Products for ``out = M^T @ x``, ``x`` of shape ``(n_in, cols)``, block by block."""
        mt = self.matrix.t()
        return [(mt[i:j, lo:hi], x[lo:hi], out[i:j]) for i, j, lo, hi in self.blocks]


_Plan = list[tuple[Tensor, Tensor, Tensor]]
"""Matrix products ``(a, b, out)``: ``out = a @ b``, run by :func:`_run_plan`."""


def _run_plan(plan: _Plan) -> None:
    for a, b, out in plan:
        torch.mm(a, b, out=out)


def _blocks_of(matrix: Tensor, block: int) -> tuple[tuple[int, int, int, int], ...]:
    """Output columns in blocks of ``block``, each with the input rows its band touches."""
    nonzero = matrix != 0
    blocks = []
    for i in range(0, matrix.shape[1], block):
        j = min(i + block, matrix.shape[1])
        rows = nonzero[:, i:j].any(dim=1).nonzero().flatten()
        blocks.append((i, j, int(rows.min()), int(rows.max()) + 1))
    return tuple(blocks)


@functools.lru_cache(maxsize=64)
def _gaussian_bands(
    n: int, size: int, sigma: float, dtype: torch.dtype, device: torch.device, block: int
) -> tuple[_Band, _Band]:
    """Valid Gaussian filtering along an axis of length ``n`` and its transpose.

    Forward ``M[a, o] = g[a - o]`` for ``0 <= a - o < size``: shape ``(n, n - size + 1)``;
    backward is ``M^T``: shape ``(n - size + 1, n)``.
    """
    g = gaussian_window(size, sigma, dtype=torch.float64, device="cpu")  # built on the host, then moved
    n_out = n - size + 1
    m = torch.zeros(n, n_out, dtype=torch.float64, device="cpu")
    cols = torch.arange(n_out, device="cpu")[None, :]
    rows = cols + torch.arange(size, device="cpu")[:, None]  # (size, n_out)
    m[rows, cols.expand(size, n_out)] = g[:, None].expand(size, n_out)
    m = m.to(dtype=dtype, device=device)
    mt = m.t().contiguous()
    return _Band(m, _blocks_of(m, block)), _Band(mt, _blocks_of(mt, block))


def _filter_plan(z: Tensor, band_h: _Band, band_w: _Band, mid: Tensor, out: Tensor) -> _Plan:
    """Separable filtering of a stack laid out ``(H, Q, B, W)`` into ``out`` ``(H', Q, B, W')``.

    ``M_h^T @ Z`` over H as banded GEMMs on ``(H, Q*B*W)`` into ``mid`` ``(H', Q*B*W)``, then
    ``@ M_w`` over W on ``(H'*Q*B, W)``. With the transposed bands it is the backward.
    """
    h, q, b, w = z.shape
    h_out, w_out = out.shape[0], out.shape[3]
    t = mid[: h_out * q * b * w].view(h_out, q * b * w)
    along_h = band_h.left(z.view(h, q * b * w), t)
    along_w = band_w.right(t.view(h_out * q * b, w), out.view(h_out * q * b, w_out))
    return along_h + along_w


# --------------------------------------------------------------------------------------------
# Fused kernel: elementwise SSIM and its hand-derived gradient
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Which moments the kernel filters, and where their gradients go (dim 1 of the stacks).

    Forward, joint (``beta == gamma``): inputs ``(x, y, x^2 + y^2, xy)`` -> moments
    ``(mu_x, mu_y, E[x^2 + y^2], E[xy])`` (``c s`` only needs ``v_x + v_y``); separate:
    ``(x, y, x^2, y^2, xy)``. Gradient stack: ``mu`` of each side that needs a gradient, then the
    second moments (``E[x^2 + y^2]`` once, or ``E[x^2]``/``E[y^2]`` per side), then ``E[xy]``.
    """

    joint: bool
    need_x: bool
    need_y: bool

    @property
    def q(self) -> int:
        return 4 if self.joint else 5

    @property
    def sides(self) -> tuple[str, ...]:
        return tuple(side for side, need in (("x", self.need_x), ("y", self.need_y)) if need)

    @property
    def nq(self) -> int:
        k = len(self.sides)
        return 0 if k == 0 else k + (1 if self.joint else k) + 1

    def mu_index(self, side: str) -> int:
        return self.sides.index(side)

    def sq_index(self, side: str) -> int:
        return len(self.sides) + (0 if self.joint else self.sides.index(side))


def _ssim_sum_and_grads(r: Tensor, spec: _Spec, scale: float, g: Tensor | None, lay: _Layout, temps: Tensor) -> Tensor:
    r"""Sum of the SSIM map over a chunk, and ``scale * dSSIM/d(moments)`` written into ``g``.

    ``r`` holds the moments of :class:`_Layout` along dim 1. With :math:`v_x = E[x^2] - \mu_x^2`,
    :math:`v_{xy} = E[xy] - \mu_x\mu_y`, :math:`l = (2\mu_x\mu_y + C_1) / d_1`,
    :math:`d_1 = \mu_x^2 + \mu_y^2 + C_1`:

    * :math:`\partial l / \partial \mu_x = 2(\mu_y - l\mu_x) / d_1` (and symmetrically);
    * joint (``beta == gamma``): :math:`cs = (2v_{xy} + C_2) / d_2`,
      :math:`d_2 = E[x^2 + y^2] - \mu_x^2 - \mu_y^2 + C_2`, :math:`\partial cs/\partial v_{xy} = 2/d_2`,
      :math:`\partial cs/\partial E[x^2 + y^2] = -cs/d_2`;
    * separate: :math:`P = s_x s_y`, :math:`c = (2P + C_2)/d_2`, :math:`s = (v_{xy} + C_3)/d_3`,
      :math:`d_3 = P + C_3`: :math:`\partial c/\partial P = 2/d_2`,
      :math:`\partial c/\partial v_x|_P = -c/d_2`, :math:`\partial s/\partial P = -s/d_3`,
      :math:`\partial s/\partial v_{xy} = 1/d_3`, :math:`\partial P/\partial v_x = P / (2 v_x)`;
    * moments: :math:`\partial v_x/\partial\mu_x = -2\mu_x`, :math:`\partial v_{xy}/\partial\mu_x = -\mu_y`.
    """
    if spec.alpha == spec.beta == spec.gamma == 1.0:
        return _standard_sum_and_grads(r, spec, scale, g, lay, temps)
    mx, my = r[:, 0], r[:, 1]
    exy = r[:, lay.q - 1]
    mxy = mx * my
    mx2, my2 = mx * mx, my * my
    d1 = mx2 + my2 + spec.c1
    lum = (2.0 * mxy + spec.c1) / d1
    cxy = exy - mxy
    terms = _Terms(scale)
    terms.add(lum, spec.alpha)
    if lay.joint:
        if spec.beta != 0.0:
            d2 = r[:, 2] - mx2 - my2 + spec.c2
            cs = (2.0 * cxy + spec.c2) / d2
            terms.add(cs, spec.beta)
    else:
        vx, vy = r[:, 2] - mx2, r[:, 3] - my2
        vxp, vyp = vx.clamp(min=0) + VAR_EPS, vy.clamp(min=0) + VAR_EPS
        prod = vxp.sqrt() * vyp.sqrt()
        if spec.beta != 0.0:
            d2 = vxp + vyp + spec.c2
            c = (2.0 * prod + spec.c2) / d2
            terms.add(c, spec.beta)
        if spec.gamma != 0.0:
            d3 = prod + spec.c3
            s = (cxy + spec.c3) / d3
            terms.add(s, spec.gamma)
    total = terms.value().sum()
    if g is None:
        return total

    # gradient w.r.t. the primitives (mu via luminance, v_x, v_y, v_xy); None means 0
    g_l_d1 = 2.0 * terms.partial(0) / d1 if spec.alpha != 0.0 else None
    g_vx = g_vy = g_cxy = None
    if lay.joint and spec.beta != 0.0:
        g_cs_d2 = terms.partial(1) / d2
        g_cxy = 2.0 * g_cs_d2
        g_vx = g_vy = -g_cs_d2 * cs
    elif not lay.joint:
        g_prod: Tensor | float = 0.0
        g_v_direct = None
        k = 1
        if spec.beta != 0.0:
            g_c_d2 = terms.partial(k) / d2
            g_prod = 2.0 * g_c_d2
            g_v_direct = -g_c_d2 * c
            k += 1
        if spec.gamma != 0.0:
            g_cxy = terms.partial(k) / d3
            g_prod = g_prod - g_cxy * s
        half = 0.5 * g_prod * prod
        g_vx, g_vy = half / vxp, half / vyp
        if g_v_direct is not None:
            g_vx, g_vy = g_vx + g_v_direct, g_vy + g_v_direct
        g_vx, g_vy = g_vx * (vx > 0), g_vy * (vy > 0)  # clamp(min=0)

    outs = g.unbind(1)
    for side, mu, other, g_v in (("x", mx, my, g_vx), ("y", my, mx, g_vy)):
        if side in lay.sides:
            _write_mu_grad(outs[lay.mu_index(side)], g_l_d1, other, lum, mu, g_v, g_cxy)
            _write_or_zero(outs[lay.sq_index(side)], g_v)
    _write_or_zero(outs[-1], g_cxy)
    return total


def _standard_sum_and_grads(
    r: Tensor, spec: _Spec, scale: float, g: Tensor | None, lay: _Layout, temps: Tensor
) -> Tensor:
    r""":func:`_ssim_sum_and_grads` for ``alpha = beta = gamma = 1`` with few, in-place operations.

    With :math:`S = l\,cs = \frac{A_1}{B_1}\frac{A_2}{B_2}`, :math:`A_1 = 2\mu_x\mu_y + C_1`,
    :math:`B_1 = \mu_x^2 + \mu_y^2 + C_1`, :math:`A_2 = 2v_{xy} + C_2`,
    :math:`B_2 = E[x^2 + y^2] - \mu_x^2 - \mu_y^2 + C_2`:

    * :math:`\partial S/\partial E[xy] = 2 l / B_2`, :math:`\partial S/\partial E[x^2 + y^2] = -S / B_2`;
    * :math:`\partial S/\partial \mu_x = 2\,cs\,(\mu_y - l\mu_x) / B_1 + (2 l / B_2)(cs\,\mu_x - \mu_y)`.

    ``r`` (joint layout) is overwritten; ``temps`` holds ``_STANDARD_TEMPS`` contiguous work maps.
    """
    mx, my, e2, exy = r.unbind(1)
    lum, b1, b2, cs, tmp = temps.unbind(0)
    a1 = torch.mul(mx, my, out=lum)
    torch.mul(my, my, out=b1).addcmul_(mx, mx)  # mu_x^2 + mu_y^2
    torch.sub(e2, b1, out=b2).add_(spec.c2)  # B2
    b1.add_(spec.c1)  # B1
    a2 = exy.mul_(2.0).sub_(a1, alpha=2.0).add_(spec.c2)  # A2, in place of E[xy]
    a1.mul_(2.0).add_(spec.c1).div_(b1)  # l, in place of A1
    torch.div(a2, b2, out=cs)
    total = torch.dot(lum.view(-1), cs.view(-1))
    if g is None:
        return total
    outs = g.unbind(1)
    g_xy = outs[-1]
    torch.div(lum, b2, out=g_xy).mul_(2.0 * scale)  # 2 l / B2
    torch.mul(g_xy, cs, out=outs[lay.sq_index(lay.sides[0])]).mul_(-0.5)  # -S / B2
    w1 = torch.div(cs, b1, out=b1).mul_(2.0 * scale)  # 2 cs / B1
    for side, mu, other in (("x", mx, my), ("y", my, mx)):
        if side in lay.sides:
            out = outs[lay.mu_index(side)]
            torch.addcmul(other, lum, mu, value=-1.0, out=out).mul_(w1)
            torch.mul(cs, mu, out=tmp).sub_(other)
            out.addcmul_(tmp, g_xy)
    return total


class _Terms:
    """The factors ``t_i^{e_i}`` of the SSIM product, their values and slopes.

    ``partial(i) = scale * d(prod_j t_j^{e_j}) / d t_i`` (a tensor, or the float ``scale``).
    Factors with exponent 0 are not added.
    """

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.values: list[Tensor] = []
        self.slopes: list[Tensor | None] = []

    def add(self, t: Tensor, exponent: float) -> None:
        if exponent == 0.0:
            self.values.append(None)  # type: ignore[arg-type]
            self.slopes.append(None)
            return
        value, slope = _signed_power_and_slope(t, exponent)
        self.values.append(value)
        self.slopes.append(slope)

    def value(self) -> Tensor:
        present = [v for v in self.values if v is not None]
        out = present[0]
        for v in present[1:]:
            out = out * v
        return out

    def partial(self, i: int) -> Tensor | float:
        out: Tensor | float = self.scale
        for j, v in enumerate(self.values):
            if j != i and v is not None:
                out = out * v
        slope = self.slopes[i]
        return out if slope is None else out * slope


def _write_or_zero(out: Tensor, value: Tensor | None) -> None:
    if value is None:
        out.zero_()
    else:
        out.copy_(value)


def _write_mu_grad(
    out: Tensor,
    g_l_d1: Tensor | None,
    other_mu: Tensor,
    lum: Tensor,
    mu: Tensor,
    g_v: Tensor | None,
    g_cxy: Tensor | None,
) -> None:
    """``dS/dmu_x = (2 g_l / d_1)(mu_y - l mu_x) - 2 mu_x g_vx - mu_y g_vxy`` into ``out``."""
    if g_l_d1 is not None:
        torch.addcmul(other_mu, lum, mu, value=-1.0, out=out)
        out.mul_(g_l_d1)
    else:
        out.zero_()
    if g_v is not None:
        out.addcmul_(mu, g_v, value=-2.0)
    if g_cxy is not None:
        out.addcmul_(other_mu, g_cxy, value=-1.0)


def _signed_power_and_slope(t: Tensor, exponent: float, tau: float = POW_TAU) -> tuple[Tensor, Tensor | None]:
    """``(signed_power(t, e), d/dt)``; the slope is None when it is the constant 1 (``e = 1``).

    ``d/dt [t (t^2 + tau^2)^p] = (t^2 + tau^2)^(p - 1) (tau^2 + e t^2)`` with ``p = (e - 1) / 2``.
    """
    if exponent == 1.0:
        return t, None
    q = t * t + tau * tau
    base = q ** ((exponent - 3.0) / 2.0)  # (t^2 + tau^2)^(p - 1)
    return t * q * base, base * (tau * tau + exponent * t * t)


# --------------------------------------------------------------------------------------------
# Fused kernel: autograd Function, chunks, workers
# --------------------------------------------------------------------------------------------


class _FusedSSIM(torch.autograd.Function):
    """Mean SSIM map of ``(x, y)`` (min-max normalised per sample when asked); hand-derived gradient.

    The output is a scalar, so ``d mean / d inputs`` is computed together with the value (one pass
    over the data, no saved moment maps) and ``backward`` only scales it, in place, by the
    incoming gradient. A second backward through the same graph (``retain_graph=True``,
    ``gradcheck``) recomputes it from the saved inputs. First-order only
    (``once_differentiable``); use :func:`ssim_map` for double backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        y: Tensor,
        spec: _Spec,
        window: tuple[int, float],
        normalize: bool,
        need_x: bool,
        need_y: bool,
    ) -> Tensor:
        args = (spec, window, normalize, need_x, need_y)
        mean, grads = _fused_mean_and_grads(x, y, *args)
        ctx.save_for_backward(x, y)
        ctx.args, ctx.grads = args, grads
        return mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None  # handed over: autograd may keep them as .grad
        if grads is None:
            _, grads = _fused_mean_and_grads(*ctx.saved_tensors, *ctx.args)
        dx, dy = (None if t is None else t.mul_(grad_out) for t in grads)
        return dx, dy, None, None, None, None, None


@dataclass
class _MinMax:
    r"""Per-sample min-max normalisation ``x_n = x s + b`` with ``s = 1 / (max - min + eps)``, ``b = -min s``.

    Its backward, from the per-sample sums :math:`S_0 = \sum g` and :math:`S_1 = \sum g\,x_n` of
    :math:`g = dL/dx_n`: :math:`dL/dx = g s` plus, at the (first) arg-min and arg-max,
    :math:`dL/d\min = s (S_1 - S_0)` and :math:`dL/d\max = -s S_1`.
    """

    scale: Tensor  # (N,)
    shift: Tensor  # (N,)
    argmin: Tensor | None  # (N,), flat index in (C, H, W); only when a gradient is needed
    argmax: Tensor | None

    @staticmethod
    def of(x: Tensor, with_index: bool) -> _MinMax:
        flat = x.detach().flatten(1)
        if with_index:
            lo, argmin = flat.min(dim=1)
            hi, argmax = flat.max(dim=1)
        else:
            lo, hi = torch.aminmax(flat, dim=1)
            argmin = argmax = None
        scale = 1.0 / (hi - lo + MINMAX_EPS)
        return _MinMax(scale, -lo * scale, argmin, argmax)

    def backward_into(self, grad: Tensor, sum_g: Tensor, sum_g_xn: Tensor) -> None:
        """Add the min/max terms to ``grad`` (``(N, ...)``, already ``g s``)."""
        assert self.argmin is not None and self.argmax is not None
        flat = grad.view(grad.shape[0], -1)
        flat.scatter_add_(1, self.argmin[:, None], (self.scale * (sum_g_xn - sum_g))[:, None])
        flat.scatter_add_(1, self.argmax[:, None], (-self.scale * sum_g_xn)[:, None])


@dataclass
class _Job:
    """Everything one call of the fused kernel shares between its plane chunks."""

    xs: Tensor
    ys: Tensor
    x_aff: list[Tensor | None]
    y_aff: list[Tensor | None]
    bands: tuple[_Band, _Band, _Band, _Band]
    spec: _Spec
    lay: _Layout
    scale: float
    dx: Tensor | None
    dy: Tensor | None
    sums_x: list[Tensor] | None
    sums_y: list[Tensor] | None

    def buffers(self, flat: Tensor, b: int) -> _ChunkBuffers:
        """Work buffers (views of ``flat``) and matrix-product plans of a chunk of ``b`` planes."""
        h, w = self.xs.shape[1:]
        band_h, band_w, band_ht, band_wt = self.bands
        h_out, w_out = band_h.matrix.shape[1], band_w.matrix.shape[1]
        q, nq = self.lay.q, self.lay.nq
        arena = _Arena(flat)
        z = arena.take(h, q, b, w)  # stacked inputs
        mid = arena.take(max(h_out * q * b * w, h * nq * b * w_out))  # between the two GEMMs
        r = arena.take(h_out, q, b, w_out)  # moments
        g = arena.take(h_out, nq, b, w_out)  # d/d moments
        dz = arena.take(h, nq, b, w)  # g filtered back
        temps = arena.take(_STANDARD_TEMPS, h_out, b, w_out)  # elementwise work maps
        return _ChunkBuffers(
            z=z.unbind(1),
            r=r,
            g=g,
            dz=dz.unbind(1),
            temps=temps,
            forward=_filter_plan(z, band_h, band_w, mid, r),
            backward=_filter_plan(g, band_ht, band_wt, mid, dz) if nq else [],
        )

    def numel(self, b: int) -> int:
        """Work memory of a chunk of ``b`` planes (what :meth:`buffers` takes)."""
        h, w = self.xs.shape[1:]
        h_out, w_out = self.bands[0].matrix.shape[1], self.bands[1].matrix.shape[1]
        q, nq = self.lay.q, self.lay.nq
        return b * (
            h * q * w
            + max(h_out * q * w, h * nq * w_out)
            + h_out * (q + nq + _STANDARD_TEMPS) * w_out
            + h * nq * w
        )

    def run(self, p0: int, p1: int, buf: _ChunkBuffers) -> Tensor:
        """SSIM-map sum of planes ``p0:p1``; writes their gradients."""
        lay, z = self.lay, buf.z
        xn = _affine_into(z[0], self.xs[p0:p1], self.x_aff, p0, p1)
        yn = _affine_into(z[1], self.ys[p0:p1], self.y_aff, p0, p1)
        if lay.joint:
            torch.mul(xn, xn, out=z[2]).addcmul_(yn, yn)
        else:
            torch.mul(xn, xn, out=z[2])
            torch.mul(yn, yn, out=z[3])
        torch.mul(xn, yn, out=z[-1])
        _run_plan(buf.forward)
        total = _ssim_sum_and_grads(buf.r, self.spec, self.scale, buf.g if lay.nq else None, lay, buf.temps)
        if not lay.nq:
            return total
        _run_plan(buf.backward)
        parts = buf.dz
        for side, out, own, other, aff, sums in (
            ("x", self.dx, xn, yn, self.x_aff, self.sums_x),
            ("y", self.dy, yn, xn, self.y_aff, self.sums_y),
        ):
            if out is not None:
                g_own = parts[lay.mu_index(side)].addcmul_(own, parts[lay.sq_index(side)], value=2.0)
                g_own.addcmul_(other, parts[-1])
                _chain_affine(out[p0:p1], g_own, own, aff, sums, p0, p1)
        return total

    def run_many(self, ranges: list[tuple[int, int]], claim: Iterator[int], step: int) -> dict[int, Tensor]:
        """Run the chunks ``ranges[i]`` for each ``i`` taken from ``claim`` on the calling thread.

        ``claim`` may be shared by several workers (``next`` on it is atomic under the GIL), so a
        worker whose core is busy elsewhere simply takes fewer chunks. Returns ``{i: sum}``.
        """
        with torch.no_grad():
            flat = _scratch(self.numel(step), self.xs.dtype, self.xs.device)
            bufs: dict[int, _ChunkBuffers] = {}
            sums = {}
            for i in claim:
                p0, p1 = ranges[i]
                if p1 - p0 not in bufs:
                    bufs[p1 - p0] = self.buffers(flat, p1 - p0)
                sums[i] = self.run(p0, p1, bufs[p1 - p0])
            return sums


@dataclass
class _ChunkBuffers:
    """Views into the work memory of one chunk size, and the matrix products between them."""

    z: tuple[Tensor, ...]
    r: Tensor
    g: Tensor
    dz: tuple[Tensor, ...]
    temps: Tensor
    forward: _Plan
    backward: _Plan


def _fused_mean_and_grads(
    x: Tensor,
    y: Tensor,
    spec: _Spec,
    window: tuple[int, float],
    normalize: bool,
    need_x: bool,
    need_y: bool,
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
    """Chunked forward (and gradient) over the ``N*C`` planes.

    Per chunk of ``B`` planes (:meth:`_Job.run`): stack the inputs of the moments as
    ``(H, Q, B, W)``, filter with two banded GEMMs, evaluate the map and ``dS/d(moments)``
    elementwise (in cache), filter those back with the transposed bands and combine
    ``dS/dx = F^T(g_mu_x) + 2 x F^T(g_E[x^2]) + y F^T(g_E[xy])``. On the CPU the chunks are
    shared out to ``torch.get_num_threads()`` single-threaded workers (see :func:`_workers`).

    Returns the mean and the gradients of ``(x, y)``.
    """
    n, ch, h, w = x.shape
    planes = n * ch
    size, sigma = window
    band_h, band_ht = _gaussian_bands(h, size, sigma, x.dtype, x.device, _BLOCK_H)
    band_w, band_wt = _gaussian_bands(w, size, sigma, x.dtype, x.device, _BLOCK_W)
    count = planes * (h - size + 1) * (w - size + 1)
    x_mm = _MinMax.of(x, need_x) if normalize else None
    y_mm = _MinMax.of(y, need_y) if normalize else None
    job = _Job(
        xs=x.detach().reshape(planes, h, w),
        ys=y.detach().reshape(planes, h, w),
        x_aff=_per_plane(x_mm, ch),
        y_aff=_per_plane(y_mm, ch),
        bands=(band_h, band_w, band_ht, band_wt),
        spec=spec,
        lay=_Layout(spec.joint_cs, need_x, need_y),
        scale=1.0 / count,
        dx=x.new_empty(planes, h, w) if need_x else None,
        dy=y.new_empty(planes, h, w) if need_y else None,
        sums_x=_new_sums(planes, x) if need_x and normalize else None,
        sums_y=_new_sums(planes, y) if need_y and normalize else None,
    )
    if x.device.type != "cpu":
        sums = job.run_many([(0, planes)], iter(range(1)), planes)
    else:
        threads = torch.get_num_threads() if _PARALLEL_CHUNKS else 1
        step = max(1, min(_CHUNK_ELEMS // (h * w), -(-planes // threads)))
        ranges = [(p0, min(p0 + step, planes)) for p0 in range(0, planes, step)]
        workers = min(threads, len(ranges))
        if workers <= 1:
            sums = job.run_many(ranges, iter(range(len(ranges))), step)
        else:
            pool = _workers(threads)
            claim = iter(range(len(ranges)))  # dynamic schedule: workers take the next chunk
            futures = [pool.submit(job.run_many, ranges, claim, step) for _ in range(workers)]
            sums = {i: t for f in futures for i, t in f.result().items()}
    for grad, mm, part in ((job.dx, x_mm, job.sums_x), (job.dy, y_mm, job.sums_y)):
        if grad is not None and mm is not None and part is not None:
            mm.backward_into(grad.view(n, -1), part[1].view(n, ch).sum(1), part[0].view(n, ch).sum(1))
    grads = (None if job.dx is None else job.dx.view_as(x), None if job.dy is None else job.dy.view_as(y))
    return torch.stack([sums[i] for i in sorted(sums)]).sum() / count, grads


_POOL_LOCK = threading.Lock()
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None


def _workers(count: int) -> ThreadPoolExecutor:
    """A pool of ``count`` threads whose torch operations run single-threaded.

    The chunks are independent, so one core per chunk (no OpenMP barrier per operation) is
    faster than intra-op parallelism on these cache-sized operations, and far less sensitive to
    how promptly the OS wakes idle cores. ``torch.set_num_threads(1)`` only changes the calling
    thread's OpenMP/MKL settings plus the default for threads started later, which is restored.
    The pool is rebuilt after a fork or when the thread count changes.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[:2] != (count, os.getpid()):
            if _POOL is not None and _POOL[1] == os.getpid():
                _POOL[2].shutdown(wait=False)
            pool = ThreadPoolExecutor(
                count, thread_name_prefix="kdsweep-ssim", initializer=torch.set_num_threads, initargs=(1,)
            )
            barrier = threading.Barrier(count)
            for f in [pool.submit(barrier.wait) for _ in range(count)]:  # start every thread now
                f.result()
            torch.set_num_threads(count)  # restore the default for threads started later
            _POOL = (count, os.getpid(), pool)
        return _POOL[2]


def _new_sums(planes: int, like: Tensor) -> list[Tensor]:
    return [like.new_empty(planes), like.new_empty(planes)]


def _per_plane(mm: _MinMax | None, channels: int) -> list[Tensor | None]:
    """Per-sample ``(scale, shift)`` -> per-plane ``(N*C, 1)`` each (broadcast over the W axis)."""
    if mm is None:
        return [None, None]
    return [t.repeat_interleave(channels)[:, None] for t in (mm.scale, mm.shift)]


def _affine_into(out: Tensor, src: Tensor, aff: list[Tensor | None], p0: int, p1: int) -> Tensor:
    """``out (H, B, W) = src (B, H, W) * scale + shift`` (or a plain copy without an affine map)."""
    src_t = src.transpose(0, 1)
    scale, shift = aff
    if scale is None:
        return out.copy_(src_t)
    return torch.addcmul(shift[p0:p1], src_t, scale[p0:p1], out=out)


def _chain_affine(
    out: Tensor, g: Tensor, xn: Tensor, aff: list[Tensor | None], sums: list[Tensor] | None, p0: int, p1: int
) -> None:
    """Write ``dL/dx = dL/dx_n * scale`` for ``x_n = x * scale + shift`` into ``out`` ``(B, H, W)``.

    ``g`` (``dL/dx_n``) and ``xn`` are laid out ``(H, B, W)``. ``sums`` receives the per-plane
    ``sum(dL/dx_n * x_n)`` and ``sum(dL/dx_n)`` (for :meth:`_MinMax.backward_into`).
    """
    scale, _ = aff
    out_t = out.transpose(0, 1)
    if scale is None:
        out_t.copy_(g)
        return
    assert sums is not None
    sums[1][p0:p1] = g.sum(dim=(0, 2))
    torch.mul(g, xn, out=out_t)
    sums[0][p0:p1] = out_t.sum(dim=(0, 2))
    torch.mul(g, scale[p0:p1], out=out_t)


_SCRATCH = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat buffer of at least ``numel`` elements, reused across calls on the CPU.

    Fresh large CPU allocations are served by ``mmap`` and page-fault on first touch, which costs
    as much as the arithmetic here; so the per-chunk work buffers (about 20 MB in float32 for the
    default chunk) are kept per thread and dtype. Other devices have caching allocators.
    """
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buffers: dict[torch.dtype, Tensor] = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device="cpu")
        buffers[dtype] = buf
    return buf[:numel]


class _Arena:
    """Hands out consecutive contiguous views of a flat buffer."""

    def __init__(self, flat: Tensor) -> None:
        self.flat = flat
        self.pos = 0

    def take(self, *shape: int) -> Tensor:
        n = math.prod(shape)
        view = self.flat[self.pos : self.pos + n].view(shape)
        self.pos += n
        return view

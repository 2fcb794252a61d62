"""The math both SSIM paths share: arguments, the generalised SSIM map from filtered moments, the
window rule for small maps, the sign-preserving power, min-max normalisation and the banded
Gaussian filters. See :mod:`kdsweep.methods.ssim` for the conventions."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Normalize = Literal["minmax"] | None

POW_TAU = 1e-4
"""Smoothing of :func:`signed_power` at 0 (its slope there is ``tau^(e - 1)``)."""
VAR_EPS = 1e-8
"""Added to the clamped variances before the square root (only when ``beta != gamma``)."""
MINMAX_EPS = 1e-6
"""Added to the range in :func:`minmax_normalize`, so that a constant map gives zeros, not NaN."""

_BLOCK_H = 16
"""Output rows per block of the banded products along H (``M^T @ X``)."""
_BLOCK_W = 32
"""Output columns per block of the banded products along W (``X @ M``)."""


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
    with torch.inference_mode(False):  # cached: usable by a training backward even if first built in evaluation
        return _bands(n, size, sigma, dtype, device, block)


def _bands(n: int, size: int, sigma: float, dtype: torch.dtype, device: torch.device, block: int) -> tuple[_Band, _Band]:
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

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
CPU tensors take the private fused kernel of :mod:`kdsweep.methods.ssim._cpu`
(:class:`~kdsweep.methods.ssim._cpu._FusedSSIM`), which returns the mean and computes its
gradient in the same pass (derived by hand, checked by ``gradcheck``). The separable Gaussian is applied as banded
matrix products (BLAS) to the stacked moments ``(x, y, x^2 + y^2, xy)``, chunk of planes by
chunk of planes so that the elementwise math stays in cache; on the CPU the chunks are shared out
to single-threaded workers (one per ``torch.get_num_threads()``) and their work memory is kept
between calls. See ``benchmarks/bench_ssim.py``.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor, nn

from kdsweep.methods.ssim._common import (
    MINMAX_EPS,
    POW_TAU,
    VAR_EPS,
    _BLOCK_H,
    _BLOCK_W,
    Normalize,
    _as_float,
    _check,
    _gaussian_bands,
    _Spec,
    _ssim_from_moments,
    effective_window,
    gaussian_window,
    minmax_normalize,
    signed_power,
)
from kdsweep.methods.ssim._cpu import _FusedSSIM

__all__ = [
    "MINMAX_EPS",
    "POW_TAU",
    "SSIMLoss",
    "VAR_EPS",
    "effective_window",
    "filter2d_valid",
    "gaussian_window",
    "minmax_normalize",
    "signed_power",
    "ssim_feature_loss",
    "ssim_map",
]


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


@functools.lru_cache(maxsize=64)
def device_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`gaussian_window` on ``device``, built once per ``(size, sigma, dtype, device)``: a
    step of the SSIM row filters 5 FPN levels, and building the window on the host then copying
    it was a blocking host-to-device copy each time. Built outside inference mode, so that a
    window first made during evaluation can still be saved for a training backward.

    Shape:
        - output: ``(size,)``.
    """
    with torch.inference_mode(False):
        return gaussian_window(size, sigma, dtype=dtype, device=device)


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
        g = device_window(k, s, x.dtype, x.device)
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

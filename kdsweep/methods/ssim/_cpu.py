"""The CPU backend of :func:`kdsweep.methods.ssim.ssim_feature_loss`: a fused kernel that returns
the mean SSIM and computes its gradient in the same pass (derived by hand, checked by
``gradcheck``). The separable Gaussian is applied as banded matrix products (BLAS) to the stacked
moments ``(x, y, x^2 + y^2, xy)``, chunk of planes by chunk of planes so that the elementwise math
stays in cache; the chunks are shared out to single-threaded workers (one per
``torch.get_num_threads()``) and their work memory is kept between calls. Private: reached only
through the dispatch of the public API, for CPU tensors. See ``benchmarks/bench_ssim.py``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from kdsweep.methods.ssim._common import (
    POW_TAU,
    VAR_EPS,
    MINMAX_EPS,
    _BLOCK_H,
    _BLOCK_W,
    _Band,
    _Plan,
    _Spec,
    _filter_plan,
    _gaussian_bands,
    _run_plan,
)

_CHUNK_ELEMS = 1 << 18
"""Input elements per plane chunk on the CPU (about 20 MB of float32 work memory per worker)."""
_PARALLEL_CHUNKS = True
"""Share the CPU chunks out to single-threaded workers (see :func:`_workers`)."""
_STANDARD_TEMPS = 5
"""Work maps of the ``alpha = beta = gamma = 1`` elementwise kernel."""


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

"""Math tests of kdsweep.methods.ssim: oracles (pytorch_msssim, kornia), identities, gradients."""

from __future__ import annotations

import warnings

import pytest
import torch

import kdsweep.methods.ssim as ssim_mod
import kdsweep.methods.ssim._cpu as ssim_cpu
from kdsweep.methods.ssim import (
    SSIMLoss,
    effective_window,
    filter2d_valid,
    gaussian_window,
    minmax_normalize,
    signed_power,
    ssim_feature_loss,
    ssim_map,
)

EXPONENTS = [(1, 1, 1), (0, 0, 1), (0.5, 0.5, 0.5), (1, 0.5, 2), (0.3, 0, 0.7), (2, 1, 0), (0, 1, 1)]


def _pair(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g, dtype=dtype)
    y = (0.6 * x + 0.4 * torch.rand(*shape, generator=g, dtype=dtype)).clamp(0, 1)  # correlated, in [0, 1]
    return x, y


def _kw(exps: tuple[float, float, float]) -> dict[str, float]:
    return dict(alpha=exps[0], beta=exps[1], gamma=exps[2])


# ----------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 4, 33, 20), (2, 2, 11, 11), (3, 5, 24, 40), (2, 64, 32, 32)])
def test_matches_pytorch_msssim(shape: tuple[int, ...]) -> None:
    from pytorch_msssim import ssim

    x, y = _pair(*shape)
    x.requires_grad_(True)
    ours = ssim_feature_loss(x, y, normalize=None)
    (g_ours,) = torch.autograd.grad(ours, x)
    ref = 1 - ssim(x, y, data_range=1, win_size=11, win_sigma=1.5)
    (g_ref,) = torch.autograd.grad(ref, x)
    assert abs(ours.item() - ref.item()) < 1e-4
    # float32 gradients summed in another order: relative 1e-3, and an absolute floor of 1e-4 of
    # the largest gradient for entries near 0, where cancellation leaves only rounding
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-3, atol=1e-4 * g_ref.abs().max().item())


def test_matches_kornia_valid_map() -> None:
    """kornia's 'valid' map is the same map (sigma 1.5, data range 1, eps=0); its loss is (1 - ssim) / 2."""
    kornia = pytest.importorskip("kornia")
    x, y = _pair(2, 3, 28, 21)
    ours = ssim_feature_loss(x, y, normalize=None)
    ref = kornia.losses.ssim_loss(x, y, 11, max_val=1.0, eps=0.0, padding="valid")
    assert abs(float(ours) - 2 * float(ref)) < 1e-5


def test_map_matches_pytorch_msssim_and_loss_is_its_mean() -> None:
    from pytorch_msssim import ssim

    x, y = _pair(2, 3, 20, 20)
    m = ssim_map(x, y, normalize=None)
    assert m.shape == (2, 3, 10, 10)
    per_channel = ssim(x, y, data_range=1, size_average=False)  # (N,) mean over C, H', W'
    torch.testing.assert_close(m.mean(dim=(1, 2, 3)), per_channel, atol=1e-5, rtol=0)
    assert abs(float(ssim_feature_loss(x, y, normalize=None)) - float(1 - m.mean())) < 1e-6


def test_gaussian_window_matches_pytorch_msssim() -> None:
    from pytorch_msssim.ssim import _fspecial_gauss_1d

    torch.testing.assert_close(gaussian_window(11, 1.5), _fspecial_gauss_1d(11, 1.5).flatten())
    assert float(gaussian_window(7, 0.9).sum()) == pytest.approx(1.0)


def test_filter2d_valid_matches_conv2d() -> None:
    x = torch.rand(2, 3, 15, 13, dtype=torch.float64)
    g = gaussian_window(11, 1.5, dtype=torch.float64)
    kernel = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    ref = torch.nn.functional.conv2d(x, kernel, groups=3)
    torch.testing.assert_close(filter2d_valid(x, 11, 1.5), ref)


# ----------------------------------------------------------------------------- identities


@pytest.mark.parametrize("exps", EXPONENTS)
@pytest.mark.parametrize("normalize", [None, "minmax"])
def test_identical_inputs_give_zero(exps: tuple[float, float, float], normalize: str | None) -> None:
    x = torch.rand(2, 3, 17, 19) * 3 - 1
    loss = ssim_feature_loss(x, x.clone(), normalize=normalize, **_kw(exps))
    # exactly 1 - 1 for the joint (c s) form; VAR_EPS / C3 ~ 2e-5 when s uses square roots
    assert abs(float(loss)) < (1e-6 if exps[1] == exps[2] else 1e-4)


def test_exponents_one_equal_l_times_c_times_s() -> None:
    """With alpha = beta = gamma = 1, l c s (computed here from the moments) is the standard SSIM."""
    x, y = _pair(2, 3, 21, 18, dtype=torch.float64)
    mx, my, exx, eyy, exy = (filter2d_valid(t, 11, 1.5) for t in (x, y, x * x, y * y, x * y))
    vx, vy, cxy = exx - mx**2, eyy - my**2, exy - mx * my
    c1, c2 = 0.01**2, 0.03**2
    sx, sy = vx.clamp(min=0).sqrt(), vy.clamp(min=0).sqrt()
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    con = (2 * sx * sy + c2) / (vx + vy + c2)
    st = (cxy + c2 / 2) / (sx * sy + c2 / 2)
    ours = ssim_feature_loss(x, y, normalize=None)
    assert abs(float(ours) - float(1 - (lum * con * st).mean())) < 1e-10
    # the separate (square-root) path agrees up to VAR_EPS
    sep = ssim_map(x, y, normalize=None, alpha=1, beta=1, gamma=1.0 + 1e-12)
    assert abs(float(sep.mean() - (lum * con * st).mean())) < 1e-4


@pytest.mark.parametrize("exps", EXPONENTS)
@pytest.mark.parametrize("normalize", [None, "minmax"])
def test_fused_loss_and_gradients_match_autograd_reference(
    exps: tuple[float, float, float], normalize: str | None
) -> None:
    x, y = _pair(2, 3, 19, 23, seed=1, dtype=torch.float64)
    x, y = (x * 2 - 0.5).requires_grad_(True), (y * 2 - 0.5).requires_grad_(True)
    kw = dict(normalize=normalize, **_kw(exps))
    loss = ssim_feature_loss(x, y, **kw)
    gx, gy = torch.autograd.grad(loss, (x, y))
    ref = 1 - ssim_map(x, y, **kw).mean()
    rx, ry = torch.autograd.grad(ref, (x, y))
    assert abs((loss - ref).item()) < 1e-12
    torch.testing.assert_close(gx, rx, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(gy, ry, rtol=1e-7, atol=1e-12)


def test_minmax_is_affine_invariant() -> None:
    x, y = _pair(2, 4, 20, 20, seed=3)
    base = ssim_feature_loss(x, y)
    moved = ssim_feature_loss(3.5 * x - 2.0, 0.25 * y + 7.0)
    assert abs(float(base) - float(moved)) < 1e-5
    torch.testing.assert_close(minmax_normalize(5 * x + 1), minmax_normalize(x), atol=1e-5, rtol=0)


def test_minmax_is_per_sample_over_c_h_w() -> None:
    x = torch.randn(3, 4, 5, 6)
    n = minmax_normalize(x)
    torch.testing.assert_close(n.flatten(1).amin(1), torch.zeros(3))
    torch.testing.assert_close(n.flatten(1).amax(1), torch.ones(3), atol=1e-5, rtol=0)
    assert torch.isfinite(minmax_normalize(torch.zeros(2, 3, 4, 4))).all()  # constant map: zeros


def test_minmax_loss_equals_loss_of_normalised_inputs() -> None:
    x, y = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    a = ssim_feature_loss(x, y, normalize="minmax")
    b = ssim_feature_loss(minmax_normalize(x), minmax_normalize(y), normalize=None)
    assert abs(float(a - b)) < 1e-6


# ----------------------------------------------------------------------------- exponents and powers


def test_signed_power_rule() -> None:
    t = torch.tensor([-1.0, -0.25, 0.0, 0.25, 1.0], dtype=torch.float64, requires_grad=True)
    assert torch.equal(signed_power(t, 1.0), t)
    assert torch.equal(signed_power(t, 0.0), torch.ones_like(t))
    p = signed_power(t, 0.5)
    torch.testing.assert_close(p, torch.sign(t) * t.abs().sqrt(), atol=1e-7, rtol=0)  # sign kept: -0.25 -> -0.5
    torch.testing.assert_close(signed_power(-t, 0.5), -p)  # odd
    (g,) = torch.autograd.grad(p.sum(), t)
    assert torch.isfinite(g).all() and (g > 0).all()
    assert float(g[2]) == pytest.approx(ssim_mod.POW_TAU ** (0.5 - 1.0))  # finite slope at 0


@pytest.mark.parametrize("exps", [(0, 0, 1), (0.5, 0.5, 0.5), (0.25, 0.5, 0.1), (1, 1, 0.5)])
def test_fractional_and_structure_only_are_finite_on_hard_inputs(exps: tuple[float, float, float]) -> None:
    """Anti-correlated (s < 0), flat (var = 0) and exactly-zero-structure regions."""
    x = torch.rand(2, 3, 24, 24)
    y = -x + 1.0  # s = -1 almost everywhere
    x_flat = x.clone()
    x_flat[:, :, :12] = 0.3  # a flat region: var_x = 0
    for s, t in ((x, y), (x_flat, y), (x_flat, x_flat.clone())):
        for normalize in (None, "minmax"):
            s_ = s.clone().requires_grad_(True)
            loss = ssim_feature_loss(s_, t, normalize=normalize, **_kw(exps))
            (g,) = torch.autograd.grad(loss, s_)
            assert torch.isfinite(loss) and torch.isfinite(g).all()
    # anti-correlation is penalised more than no correlation
    assert float(ssim_feature_loss(x, y, normalize=None, **_kw(exps))) > float(
        ssim_feature_loss(x, torch.rand(2, 3, 24, 24), normalize=None, **_kw(exps))
    )


def test_structure_only_ignores_luminance_and_contrast() -> None:
    x, _ = _pair(2, 3, 20, 20)
    # same structure, different mean and spread: structure-only sees (almost) no difference
    assert float(ssim_feature_loss(x, 0.3 * x + 0.5, normalize=None, alpha=0, beta=0, gamma=1)) < 1e-3
    assert float(ssim_feature_loss(x, 0.3 * x + 0.5, normalize=None)) > 0.05


# ----------------------------------------------------------------------------- small maps


def test_effective_window_rule() -> None:
    assert effective_window(16, 16, 11, 1.5) == (11, 1.5)
    assert effective_window(64, 11, 11, 1.5) == (11, 1.5)
    assert effective_window(4, 4, 11, 1.5) == (3, pytest.approx(1.5 * 3 / 11))
    assert effective_window(8, 5, 11, 1.5) == (5, pytest.approx(1.5 * 5 / 11))
    assert effective_window(2, 2, 11, 1.5)[0] == 1
    assert effective_window(1, 1, 11, 1.5)[0] == 1


@pytest.mark.parametrize("hw", [(4, 4), (2, 2), (1, 1), (3, 5), (10, 10), (16, 3)])
@pytest.mark.parametrize("exps", [(1, 1, 1), (0, 0, 1), (0.5, 0.5, 0.5)])
def test_small_maps_give_finite_loss_and_gradient(hw: tuple[int, int], exps: tuple[float, float, float]) -> None:
    x = torch.randn(2, 4, *hw, requires_grad=True)
    y = torch.randn(2, 4, *hw)
    loss = ssim_feature_loss(x, y, **_kw(exps))
    (g,) = torch.autograd.grad(loss, x)
    assert loss.shape == () and torch.isfinite(loss) and torch.isfinite(g).all()
    k, _ = effective_window(*hw, 11, 1.5)
    assert ssim_map(x, y, **_kw(exps)).shape == (2, 4, hw[0] - k + 1, hw[1] - k + 1)


def test_one_by_one_map_is_per_pixel_luminance() -> None:
    x, y = torch.rand(3, 5, 1, 1, dtype=torch.float64), torch.rand(3, 5, 1, 1, dtype=torch.float64)
    c1 = 0.01**2
    lum = (2 * x * y + c1) / (x**2 + y**2 + c1)
    for exps in [(1, 1, 1), (1, 0, 0), (1, 0.5, 2)]:  # c = s = 1 (s up to VAR_EPS / C3)
        loss = ssim_feature_loss(x, y, normalize=None, **_kw(exps))
        assert abs(float(loss) - float(1 - lum.mean())) < 1e-4
    assert abs(float(ssim_feature_loss(x, y, normalize=None)) - float(1 - lum.mean())) < 1e-12


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("exps", [(1, 1, 1), (0, 0, 1), (0.5, 0.7, 0.7), (1, 0.5, 2)])
@pytest.mark.parametrize("normalize", [None, "minmax"])
def test_gradcheck_float64(exps: tuple[float, float, float], normalize: str | None) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 2, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 2, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ssim_feature_loss(a, b, window_size=5, sigma=1.0, normalize=normalize, **_kw(exps))

    assert torch.autograd.gradcheck(f, (x, y), eps=1e-6, atol=1e-7, rtol=1e-4)


def test_gradient_reaches_student_and_what_made_it_not_teacher() -> None:
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    teacher_param = torch.ones(1, requires_grad=True)
    inp = torch.rand(2, 3, 20, 20)
    student = conv(inp)
    teacher = (torch.rand(2, 4, 20, 20) * teacher_param).detach()
    ssim_feature_loss(student, teacher).backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert float(conv.weight.grad.abs().sum()) > 0
    assert teacher_param.grad is None


def test_teacher_without_grad_and_no_grad_mode() -> None:
    x, y = _pair(2, 3, 16, 16)
    with torch.no_grad():
        a = ssim_feature_loss(x, y)
    b = ssim_feature_loss(x.requires_grad_(True), y)
    assert not a.requires_grad and b.requires_grad
    assert float(a) == pytest.approx(b.item(), abs=1e-7)


def test_backward_twice_with_retained_graph() -> None:
    x, y = _pair(2, 3, 16, 16)
    x.requires_grad_(True)
    loss = ssim_feature_loss(x, y)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_gradient_scales_with_upstream_gradient() -> None:
    x, y = _pair(2, 3, 16, 16)
    x.requires_grad_(True)
    (g1,) = torch.autograd.grad(ssim_feature_loss(x, y), x)
    (g3,) = torch.autograd.grad(3.0 * ssim_feature_loss(x, y), x)
    torch.testing.assert_close(g3, 3 * g1)


def test_half_inputs_are_computed_in_float32() -> None:
    x, y = _pair(2, 3, 16, 16)
    xh = x.half().requires_grad_(True)
    loss = ssim_feature_loss(xh, y.half())
    loss.backward()
    assert loss.dtype == torch.float32 and xh.grad is not None and xh.grad.dtype == torch.float16
    assert abs(loss.item() - float(ssim_feature_loss(x.half().float(), y.half().float()))) < 1e-6


# ----------------------------------------------------------------------------- execution paths


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("chunk", [1 << 8, 1 << 11, 1 << 18])
def test_chunking_and_workers_do_not_change_results(
    monkeypatch: pytest.MonkeyPatch, parallel: bool, chunk: int
) -> None:
    x, y = _pair(3, 5, 18, 18, seed=5, dtype=torch.float64)
    x = (x * 4 - 1).requires_grad_(True)
    ref = 1 - ssim_map(x, y).mean()
    (g_ref,) = torch.autograd.grad(ref, x)
    monkeypatch.setattr(ssim_cpu, "_PARALLEL_CHUNKS", parallel)
    monkeypatch.setattr(ssim_cpu, "_CHUNK_ELEMS", chunk)  # 1 << 8: one plane per chunk
    loss = ssim_feature_loss(x, y)
    (g,) = torch.autograd.grad(loss, x)
    assert abs((loss - ref).item()) < 1e-12
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-14)


def test_module_matches_function() -> None:
    x, y = _pair(2, 3, 16, 16)
    kw = dict(alpha=0.5, beta=1.0, gamma=2.0, window_size=7, sigma=1.2, normalize=None, k1=0.02, k2=0.05)
    module = SSIMLoss(**kw)
    assert float(module(x, y)) == float(ssim_feature_loss(x, y, **kw))
    assert "window_size=7" in repr(module)
    assert float(SSIMLoss()(x, y)) == float(ssim_feature_loss(x, y))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window_size=4),
        dict(window_size=0),
        dict(alpha=-1.0),
        dict(alpha=0, beta=0, gamma=0),
        dict(normalize="zscore"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict) -> None:
    x, y = _pair(1, 1, 12, 12)
    with pytest.raises(ValueError):
        ssim_feature_loss(x, y, **kwargs)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        ssim_feature_loss(torch.rand(1, 2, 8, 8), torch.rand(1, 3, 8, 8))


def test_no_pytorch_msssim_warning_on_small_maps() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = ssim_feature_loss(torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3))
    assert caught == []  # the window shrinks silently (pytorch_msssim warns and skips smoothing)
    assert torch.isfinite(loss) and 0.0 <= float(loss) <= 2.0


# ------------------------------------------------------------------- the path of non-CPU devices
def test_non_cpu_tensors_take_the_device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatch: a meta tensor (as a CUDA one) never reaches the CPU kernel; a CPU one does."""
    import kdsweep.methods.ssim as ssim_module

    calls: list[str] = []
    real = ssim_module._device_ssim_mean
    monkeypatch.setattr(ssim_module, "_device_ssim_mean", lambda *a: calls.append(a[0].device.type) or real(*a))
    monkeypatch.setattr(ssim_cpu._FusedSSIM, "apply", lambda *a: calls.append("fused") or torch.zeros(()))
    x = torch.empty(2, 3, 16, 16, device="meta", requires_grad=True)
    out = ssim_feature_loss(x, torch.empty(2, 3, 16, 16, device="meta"))
    assert out.device.type == "meta" and out.shape == () and calls == ["meta"]
    ssim_feature_loss(*_pair(2, 3, 16, 16))
    assert calls == ["meta", "fused"]


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 4, 33, 20), (2, 2, 11, 11), (2, 64, 32, 32)])
def test_device_path_matches_pytorch_msssim(shape: tuple[int, ...]) -> None:
    """The device path, run on CPU tensors, against the oracle: loss to 1e-4 (as the CPU path),
    gradients as in test_matches_pytorch_msssim."""
    from pytorch_msssim import ssim

    from kdsweep.methods.ssim import _check, _device_ssim_mean

    x, y = _pair(*shape)
    x.requires_grad_(True)
    spec = _check(x, y, 1.0, 1.0, 1.0, 11, 1.5, None, 0.01, 0.03)
    ours = 1 - _device_ssim_mean(x, y, spec, effective_window(shape[-2], shape[-1], 11, 1.5), False)
    (g_ours,) = torch.autograd.grad(ours, x)
    ref = 1 - ssim(x, y, data_range=1, win_size=11, win_sigma=1.5)
    (g_ref,) = torch.autograd.grad(ref, x)
    assert abs(ours.item() - ref.item()) < 1e-4
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-3, atol=1e-4 * g_ref.abs().max().item())


@pytest.mark.parametrize("exps", [(1.0, 1.0, 1.0), (0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (0.5, 0.7, 1.3)])
@pytest.mark.parametrize("shape", [(2, 4, 20, 18), (1, 3, 4, 4), (2, 2, 1, 1)])
def test_device_path_equals_the_cpu_kernel(exps: tuple[float, float, float], shape: tuple[int, ...]) -> None:
    """Same value and gradient as the fused CPU kernel in float64, with min-max normalisation,
    every exponent combination of the ablation and the small maps whose window shrinks."""
    from kdsweep.methods.ssim import _check, _device_ssim_mean

    x, y = _pair(*shape, dtype=torch.float64)
    x.requires_grad_(True)
    spec = _check(x, y, *exps, 11, 1.5, "minmax", 0.01, 0.03)
    device = 1 - _device_ssim_mean(x, y, spec, effective_window(shape[-2], shape[-1], 11, 1.5), True)
    (g_device,) = torch.autograd.grad(device, x)
    fused = ssim_feature_loss(x, y, **_kw(exps))
    (g_fused,) = torch.autograd.grad(fused, x)
    torch.testing.assert_close(device, fused, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_device, g_fused, rtol=1e-7, atol=1e-12)


def test_the_device_path_builds_its_window_once_per_device_and_dtype(monkeypatch) -> None:
    """The Gaussian window of the device path is cached per (size, sigma, dtype, device): a step
    filters 5 FPN levels, and building it on the host each call was a blocking copy on GPUs. A
    window first built under inference mode (evaluation) still serves a training backward."""
    from kdsweep.methods import ssim as ssim_module
    from kdsweep.methods.ssim import _check, _device_ssim_mean

    built: list[torch.dtype] = []
    real = ssim_module.gaussian_window
    monkeypatch.setattr(ssim_module, "gaussian_window", lambda *a, **k: built.append(k["dtype"]) or real(*a, **k))
    ssim_module.device_window.cache_clear()
    x, y = _pair(2, 3, 24, 24, seed=7)
    spec = _check(x, y, 1.0, 1.0, 1.0, 11, 1.5, None, 0.01, 0.03)
    with torch.inference_mode():
        _device_ssim_mean(x, y, spec, (11, 1.5), False)
    x = x.clone().requires_grad_(True)
    for _ in range(3):
        _device_ssim_mean(x, y, spec, (11, 1.5), False).backward()
    assert built == [torch.float32] and x.grad is not None and torch.isfinite(x.grad).all()
    _device_ssim_mean(x.detach().double(), y.double(), spec, (11, 1.5), False)
    assert built == [torch.float32, torch.float64]
    ssim_module.device_window.cache_clear()

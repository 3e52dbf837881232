"""The products of nets.matmul: float32-accurate on whichever kernel they run, the precision setting
restored after each call, and small products kept off oneDNN."""

from __future__ import annotations

import pytest
import torch

from policylab.nets import matmul


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "transpose_a"),
    [
        ((2, 256, 256), (2, 256, 256), False),  # a hidden layer of twin critics
        ((2, 256, 256), (2, 256, 256), True),  # its weight gradient, h^T g
        ((1, 512, 256), (1, 256, 256), False),  # SAC's actor on [s; s']
        ((2, 256, 400), (2, 400, 300), False),  # TD3's critics
    ],
)
def test_products_are_float32_accurate(a_shape, b_shape, transpose_a) -> None:
    g = torch.Generator().manual_seed(1)
    a = 1.0 + 1e-3 * torch.randn(a_shape, generator=g)  # bfloat16 inputs would lose the 1e-3 offsets
    b = torch.randn(b_shape, generator=g)
    if transpose_a:
        a = a.transpose(1, 2).contiguous().transpose(1, 2)
    bias = torch.randn(b_shape[0], 1, b_shape[2], generator=g)
    reference = torch.bmm(a.double(), b.double())
    assert matmul._relative_error(matmul.bmm(a, b), reference) < 1e-5
    out = torch.empty(reference.shape)
    assert matmul.bmm(a, b, out=out) is out
    assert matmul._relative_error(out, reference) < 1e-5
    with_bias = 2.0 * bias.double() + 2.0 * reference
    assert matmul._relative_error(matmul.baddbmm(bias, a, b, beta=2.0, alpha=2.0), with_bias) < 1e-5


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "transpose_b"),
    [
        ((2, 256, 14), (2, 14, 256), False),  # twin critics' first layer
        ((1, 256, 256), (1, 256, 256), False),  # a hidden layer
        ((2, 256, 256), (2, 1, 256), True),  # twin critics' output layer, stored [K, out, in]
        ((1, 1, 11), (1, 11, 64), False),  # one row (acting): stays on baddbmm
    ],
)
def test_bias_products_on_mkl_are_float32_accurate(monkeypatch, a_shape, b_shape, transpose_b) -> None:
    """On MKL, `baddbmm` with beta = alpha = 1 is a product and an in-place bias add (one row stays on
    baddbmm): float32-accurate against a float64 reference (on the Intel Xeon's MKL also bit for bit equal to
    torch.baddbmm; other kernels may round the sum in another order)."""
    monkeypatch.setattr(matmul, "_use_onednn", False)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(a_shape, generator=g)
    b = torch.randn(b_shape, generator=g)
    b = b.transpose(1, 2) if transpose_b else b
    bias = torch.randn(a_shape[0], 1, b.shape[2], generator=g)
    exact = torch.baddbmm(bias.double(), a.double(), b.double())
    assert matmul._relative_error(matmul.baddbmm(bias, a, b), exact) < 1e-5


def test_precision_setting_is_restored() -> None:
    settings = torch.backends.mkldnn.matmul
    before = settings.fp32_precision
    a = torch.randn(2, 256, 256)
    matmul.bmm(a, a)
    assert settings.fp32_precision == before
    with pytest.raises(RuntimeError):
        matmul._onednn_call(torch.bmm, a, torch.randn(2, 3, 3))
    assert settings.fp32_precision == before


def test_small_products_stay_on_mkl(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(matmul, "_use_onednn", True)
    monkeypatch.setattr(matmul, "_onednn_call", lambda op, *a, **k: calls.append(op) or op(*a, **k))
    matmul.bmm(torch.randn(2, 256, 4), torch.randn(2, 4, 256))  # inner dimension 4: a first layer
    matmul.bmm(torch.randn(1, 64, 64), torch.randn(1, 64, 64))  # 2^18 multiply-adds
    matmul.bmm(torch.randn(2, 256, 256, dtype=torch.float64), torch.randn(2, 256, 256, dtype=torch.float64))
    assert calls == []
    matmul.bmm(torch.randn(2, 256, 256), torch.randn(2, 256, 256))
    assert calls == [torch.bmm]


def test_environment_turns_onednn_off(monkeypatch) -> None:
    monkeypatch.setenv("POLICYLAB_ONEDNN_MATMUL", "0")
    monkeypatch.setattr(matmul, "_use_onednn", None)
    assert not matmul.use_onednn()


def test_probe_accepts_float32_and_rejects_a_bfloat16_kernel(monkeypatch) -> None:
    """A float32 kernel passes the probe; a oneDNN that really rounds to bfloat16 (as with AMX) fails it."""

    def bfloat16_call(op, *args, **kwargs):
        return op(*(x.bfloat16().float() if isinstance(x, torch.Tensor) else x for x in args), **kwargs)

    monkeypatch.setattr(matmul, "_onednn_call", lambda op, *args, **kwargs: op(*args, **kwargs))
    assert matmul._onednn_exact()
    monkeypatch.setattr(matmul, "_onednn_call", bfloat16_call)
    assert not matmul._onednn_exact()


def test_onednn_is_used_only_on_the_cpus_where_it_was_measured_faster(tmp_path, monkeypatch) -> None:
    """AMD with AVX-512 (oneDNN's AVX-512 kernel against MKL's AVX2 code: 2.1x); not AMD with AVX2 only, not
    Intel; and never when the exactness half of the probe fails or the switch is off."""
    cpuinfo = tmp_path / "cpuinfo"

    def cpu(vendor: str, flags: str) -> None:
        block = f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 {flags}\n\n"
        cpuinfo.write_text(block + block.replace(": 0", ": 1"))

    cpu("AuthenticAMD", "avx2 avx512f avx512bw")
    assert matmul._onednn_faster(cpuinfo)
    cpu("AuthenticAMD", "avx2 fma")
    assert not matmul._onednn_faster(cpuinfo)
    cpu("GenuineIntel", "avx2 avx512f amx_bf16")
    assert not matmul._onednn_faster(cpuinfo)
    assert not matmul._onednn_faster(tmp_path / "missing")

    monkeypatch.delenv("POLICYLAB_ONEDNN_MATMUL", raising=False)
    monkeypatch.setattr(matmul, "_onednn_faster", lambda: True)
    monkeypatch.setattr(matmul, "_onednn_exact", lambda: False)
    assert not matmul._probe()
    monkeypatch.setattr(matmul, "_onednn_exact", lambda: True)
    assert matmul._probe()
    monkeypatch.setenv("POLICYLAB_ONEDNN_MATMUL", "0")
    assert not matmul._probe()


def test_bf16_precision_is_opt_in_and_refused_without_native_bfloat16(monkeypatch) -> None:
    """precision=bf16 routes the large products to oneDNN with bfloat16 allowed (float32 accumulation and
    output, about 3 significant digits); the default stays float32-exact; a CPU without native bfloat16 gets
    one error naming the fix, and a bad value another."""
    from policylab.errors import ConfigError

    g = torch.Generator().manual_seed(3)
    a = 1.0 + 1e-3 * torch.randn(2, 256, 256, generator=g)  # offsets that bfloat16 inputs lose
    b = torch.randn(2, 256, 256, generator=g)
    exact = torch.bmm(a.double(), b.double())
    calls = []
    monkeypatch.setattr(matmul, "_onednn_call", lambda op, *args, **kw: calls.append(op) or op(*args, **kw))
    monkeypatch.setattr(matmul, "bf16_native", lambda: True)
    monkeypatch.setattr(matmul, "_use_onednn", False)
    try:
        matmul.set_precision("bf16")
        monkeypatch.setattr(matmul, "_bf16_by_setting", True)  # oneDNN's setting computes in bfloat16 (AMX)
        assert matmul._relative_error(matmul.bmm(a, b), exact) < 2e-2 and calls == [torch.bmm]
        monkeypatch.setattr(matmul, "_bf16_by_setting", False)  # it keeps float32: cast the inputs instead
        bias = torch.randn(2, 1, 256, generator=g)
        low = matmul.baddbmm(bias, a, b, beta=2.0, alpha=2.0)
        out = torch.empty(2, 256, 256)
        assert matmul.bmm(a, b, out=out) is out and calls == [torch.bmm]
        reference = torch.baddbmm(bias.double(), a.double(), b.double(), beta=2.0, alpha=2.0)
        assert low.dtype == torch.float32 and 1e-5 < matmul._relative_error(low, reference) < 2e-2
        assert 1e-5 < matmul._relative_error(out, exact) < 2e-2
        matmul.set_precision("fp32")
        assert matmul._relative_error(matmul.bmm(a, b), exact) < 1e-5 and calls == [torch.bmm]
        monkeypatch.setattr(matmul, "bf16_native", lambda: False)
        with pytest.raises(ConfigError, match="native bfloat16"):
            matmul.set_precision("bf16")
        with pytest.raises(ConfigError, match="precision='fp16'"):
            matmul.set_precision("fp16")
    finally:
        matmul._precision = "fp32"


def test_the_bf16_probe_tells_a_bfloat16_setting_from_a_float32_one(monkeypatch) -> None:
    """bf16_by_setting: true where oneDNN's reduced-precision setting rounds the inputs to bfloat16 (simulated),
    false where it keeps float32 (simulated: the exact product)."""
    monkeypatch.setattr(matmul, "_bf16_by_setting", None)
    monkeypatch.setattr(matmul, "_onednn_call", lambda op, a, b: torch.bmm(a.bfloat16(), b.bfloat16()).float())
    assert matmul.bf16_by_setting()
    monkeypatch.setattr(matmul, "_bf16_by_setting", None)
    monkeypatch.setattr(matmul, "_onednn_call", lambda op, a, b: torch.bmm(a, b))
    assert not matmul.bf16_by_setting()


def test_bf16_native_reads_the_cpu_flags(tmp_path) -> None:
    amx = tmp_path / "amx"
    amx.write_text("vendor_id\t: GenuineIntel\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\nprocessor : 1\n")
    plain = tmp_path / "plain"
    plain.write_text("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2\n")
    has_setting = hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision")
    assert matmul.bf16_native(amx) == (has_setting and torch.backends.mkldnn.is_available())
    assert not matmul.bf16_native(plain)


def test_a_run_takes_precision_bf16_only_where_the_cpu_has_native_bfloat16() -> None:
    """The config check at resolution: accepted (and the process left on float32 until a run starts) where the
    CPU has AMX or AVX512-BF16, one error naming the fix elsewhere."""
    from policylab.algos import get_algo
    from policylab.errors import ConfigError
    from policylab.train import resolve_config

    def resolve():
        return resolve_config(get_algo("sac"), env="Pendulum-v1", overrides={"precision": "bf16"}, preset="none")

    if matmul.bf16_native():
        assert resolve()[0].precision == "bf16" and matmul.precision() == "fp32"
    else:
        with pytest.raises(ConfigError, match="native bfloat16"):
            resolve()


def test_routed_products_keep_their_route_in_the_backward(monkeypatch) -> None:
    """Under autograd a routed layer (oneDNN, or bfloat16 by precision) sends its backward's products through
    `bmm` too, with the gradients of torch.baddbmm; unrouted ones stay on torch.baddbmm (no Python function)."""
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(2, 1, 300, generator=g, requires_grad=True)
    a = torch.randn(2, 256, 400, generator=g).requires_grad_(True)
    w = torch.randn(2, 300, 400, generator=g, requires_grad=True)  # stored [K, out, in]: used transposed
    x = a.detach()[:1, :, :].expand(2, -1, -1).requires_grad_(False)  # a shared input, as a first layer's
    upstream = torch.randn(2, 256, 300, generator=g)

    def grads(fn, inputs):
        for t in (bias, a, w):
            t.grad = None
        (fn(bias, inputs, w.transpose(1, 2)) * upstream).sum().backward()
        return [t.grad.clone() if t.grad is not None else None for t in (bias, a, w)]

    calls: list = []

    def recorded(op, *args, **kw):
        calls.append(op)
        return op(*args, **kw)

    for inputs in (a, x):
        expected = grads(torch.baddbmm, inputs)
        calls.clear()
        monkeypatch.setattr(matmul, "worth_routing", lambda *args: True)
        monkeypatch.setattr(matmul, "_onednn_call", recorded)
        got = grads(matmul.affine, inputs)
        monkeypatch.undo()
        for mine, want in zip(got, expected):
            assert (mine is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-4)
        # the forward's product (its bias added after, in place) and the backward's one or two
        assert calls.count(torch.bmm) == (3 if inputs is a else 2) and calls.count(torch.baddbmm) == 0
    with torch.no_grad():
        assert matmul.affine(bias, a, w.transpose(1, 2)).grad_fn is None


def test_linear_routes_its_backward_and_matches_nn_linear(monkeypatch) -> None:
    """`matmul.linear` (the CNN encoders' feature layer): nn.Linear's output and gradients, the forward on MKL
    (oneDNN reorders a transposed weight per call) and the backward's two products through the routed kernel;
    no Python function without autograd, under autocast, or for other dtypes."""
    g = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(3136, 512)
    x = torch.rand(64, 3136, generator=g, requires_grad=True)
    upstream = torch.randn(64, 512, generator=g)

    def grads(fn):
        for t in (x, layer.weight, layer.bias):
            t.grad = None
        out = fn(x, layer.weight, layer.bias)
        (out * upstream).sum().backward()
        return out.detach(), [t.grad.clone() for t in (x, layer.weight, layer.bias)]

    calls: list = []

    def recorded(op, *args, **kw):
        calls.append(op)
        return op(*args, **kw)

    expected_out, expected = grads(torch.nn.functional.linear)
    monkeypatch.setattr(matmul, "worth_routing", lambda *args: True)
    monkeypatch.setattr(matmul, "_onednn_call", recorded)
    out, got = grads(matmul.linear)
    assert calls == [torch.bmm, torch.bmm]  # grad_x and grad_weight; the forward stayed on F.linear
    assert torch.equal(out, expected_out)
    for mine, want in zip(got, expected):
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert matmul.linear(x, layer.weight, layer.bias).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert matmul.linear(x, layer.weight, layer.bias).dtype == torch.bfloat16  # autocast's F.linear
    in_float64 = matmul.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert in_float64.grad_fn.name() != "_RoutedLinearBackward"

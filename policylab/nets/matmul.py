"""Batched matrix products on the fastest exact float32 kernel this CPU has.

PyTorch's CPU float32 `bmm` calls MKL, which on AMD processors runs its AVX2 code: on the benchmark
machine (AMD EPYC, Zen 5, AVX-512) a 256x256x256 product runs at about 113 GFLOP/s per core through
MKL and about 235-250 GFLOP/s through oneDNN's AVX-512 float32 kernel (`brg_matmul:avx512_core`), in the
same float32 arithmetic (`benchmarks/micro.py --only matmul`). PyTorch routes float32 products to
oneDNN only while reduced-precision math is allowed (`torch.backends.mkldnn.matmul.fp32_precision =
"bf16"`); oneDNN takes that as permission, not an order: on this CPU (AVX-512 with bfloat16 instructions,
no AMX) it keeps float32, while with AMX it may compute in bfloat16.

So the products here switch that setting on for the duration of one call, and only after a probe has
shown, once per process, that the oneDNN path gives float32 results (relative error against float64
within a few times MKL's own, where bfloat16 inputs would be ~1000x worse), and only on the CPUs where
oneDNN was measured faster: AMD processors with AVX-512 (`_onednn_faster`). Elsewhere (an AMD processor
with AVX2 only, where the two kernels ran at 0.9-1.3x of each other over the hot shapes on an EPYC Zen 3;
Intel processors, where MKL runs its own best code and oneDNN may use bfloat16 with AMX; a PyTorch
without the setting), every call is plain `torch.bmm`. Small products stay on MKL
too: below about 2^20 multiply-adds, or with an inner dimension under 16, oneDNN's fixed cost per call
outweighs its speed (the small shapes of `benchmarks/micro.py --only matmul`).

`POLICYLAB_ONEDNN_MATMUL=0` in the environment turns the oneDNN path off.

`set_precision("bf16")` (a run's `precision=bf16`) is the opt-in exception: where the CPU has native bfloat16
(AMX or AVX512-BF16), the same large products run with bfloat16 inputs and float32 accumulation; the weights,
gradients and optimizer state stay float32. Where oneDNN's reduced-precision setting does compute in bfloat16
(AMX: an Intel Xeon ran 3.3x MKL's float32 on a 256x256x256 product) the products go there with float32
outputs. Where it keeps float32 (AVX512-BF16 without AMX, e.g. an AMD EPYC Zen 4: the setting changed no bit),
the inputs are cast to bfloat16 and torch's bfloat16 product runs (about 2x the float32 product there, casts
included), its output rounded to bfloat16 and cast back; a probe decides which, once per process (`_bf16_route`).
It changes the results (about 3 significant digits per product), so it is off by default.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

MIN_MACS_PER_MEMBER = 1 << 20
MIN_INNER = 16
_PROBE_TOLERANCE = 8.0  # x MKL's relative error; bfloat16 inputs give ~1000x
_use_onednn: bool | None = None
_bf16_by_setting: bool | None = None
_precision = "fp32"
PRECISIONS = ("fp32", "bf16")


def _relative_error(x: Tensor, reference: Tensor) -> float:
    return float((x.double() - reference).abs().max() / reference.abs().max())


def use_onednn() -> bool:
    """Whether large float32 products go to oneDNN here: it is exact and faster (probed once per process)."""
    global _use_onednn
    if _use_onednn is None:
        _use_onednn = _probe()
    return _use_onednn


def bf16_native(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 products natively (AMX or AVX512-BF16) and torch can reach them."""
    settings = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if not torch.backends.mkldnn.is_available() or not hasattr(settings, "fp32_precision"):
        return False
    try:
        flags = cpuinfo.read_text().split("\n\n", 1)[0]
    except OSError:
        return False
    words = set(flags.replace(":", " ").split())
    return bool(words & {"amx_bf16", "avx512_bf16"})


def check_precision(precision: str) -> None:
    """A known precision this CPU can run: one error naming the fix otherwise."""
    from policylab.errors import ConfigError

    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}", "use fp32 or bf16")
    if precision == "bf16" and not bf16_native():
        raise ConfigError(
            "precision=bf16 needs a CPU with native bfloat16 products (AMX or AVX512-BF16); this one has neither",
            "use precision=fp32 (the default) here",
        )


def set_precision(precision: str) -> None:
    """fp32 (exact float32 products) or bf16 (large products in bfloat16 with float32 accumulation, where the
    CPU has native bfloat16); the setting of the process until changed."""
    global _precision
    check_precision(precision)
    _precision = precision


def precision() -> str:
    return _precision


def _probe() -> bool:
    if os.environ.get("POLICYLAB_ONEDNN_MATMUL", "1") == "0":
        return False
    return _onednn_exact() and _onednn_faster()


def _probe_problem() -> tuple[Tensor, Tensor, Tensor, float]:
    """A product whose inputs lose their offsets when rounded to bfloat16 (values near 1, offsets of 1e-3):
    a, b, the float64 product and the float32 product's relative error."""
    generator = torch.Generator().manual_seed(0)
    a = 1.0 + 1e-3 * torch.randn(2, 256, 256, generator=generator)
    b = torch.randn(2, 256, 256, generator=generator)
    reference = torch.bmm(a.double(), b.double())
    return a, b, reference, _relative_error(torch.bmm(a, b), reference)


def _onednn_exact() -> bool:
    """Whether oneDNN's float32 products are float32-accurate here (not bfloat16 in disguise)."""
    settings = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if not torch.backends.mkldnn.is_available() or not hasattr(settings, "fp32_precision"):
        return False
    a, b, reference, mkl_error = _probe_problem()
    try:
        onednn = _onednn_call(torch.bmm, a, b)
        onednn_t = _onednn_call(torch.bmm, a.transpose(1, 2).contiguous().transpose(1, 2), b)
    except RuntimeError:
        return False
    bound = _PROBE_TOLERANCE * max(mkl_error, 1e-7)
    return _relative_error(onednn, reference) <= bound and _relative_error(onednn_t, reference) <= bound


def _onednn_faster(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether oneDNN's float32 kernel is the faster one on this CPU: an AMD processor with AVX-512, where MKL
    runs its AVX2 code and oneDNN its AVX-512 kernel (2.1x on a 256x256x256 product on an EPYC Zen 5). On
    an AMD processor with AVX2 only they are close (0.96x on that product, 0.9-1.3x over the hot shapes on an
    EPYC Zen 3), and on Intel processors MKL runs its own best code. Decided from the CPU, not by timing at
    start-up: the kernel changes the last bits of every product, and a seed must fix a run on one machine."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    first = text.split("\n\n", 1)[0]  # one processor's block
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("vendor_id") == "AuthenticAMD" and "avx512f" in fields.get("flags", "").split()


def bf16_by_setting() -> bool:
    """Whether oneDNN's reduced-precision setting computes in bfloat16 here (AMX), not float32: its error on
    inputs near 1 is bfloat16's (probed once per process)."""
    global _bf16_by_setting
    if _bf16_by_setting is None:
        a, b, reference, mkl_error = _probe_problem()
        try:
            error = _relative_error(_onednn_call(torch.bmm, a, b), reference)
        except RuntimeError:
            error = mkl_error
        _bf16_by_setting = error > 100 * max(mkl_error, 1e-7)
    return _bf16_by_setting


def _bf16_call(op, *args, **kwargs) -> Tensor:  # type: ignore[no-untyped-def]
    """A product with bfloat16 inputs and float32 accumulation: by oneDNN's setting where that computes in
    bfloat16, else on inputs cast to bfloat16 (output rounded to bfloat16, returned as float32)."""
    if bf16_by_setting():
        return _onednn_call(op, *args, **kwargs)
    if op is torch.bmm:
        a, b = args
        product = torch.bmm(a.bfloat16(), b.bfloat16())
        out = kwargs.get("out")
        return product.float() if out is None else out.copy_(product)
    bias, a, b = args
    beta, alpha = kwargs.get("beta", 1.0), kwargs.get("alpha", 1.0)
    product = torch.bmm(a.bfloat16(), b.bfloat16()).float()
    if alpha != 1.0:
        product.mul_(alpha)
    return product.add_(bias, alpha=beta)


def _onednn_call(op, *args, **kwargs) -> Tensor:  # type: ignore[no-untyped-def]
    settings = torch.backends.mkldnn.matmul  # type: ignore[attr-defined]
    previous = settings.fp32_precision
    settings.fp32_precision = "bf16"
    try:
        return op(*args, **kwargs)
    finally:
        settings.fp32_precision = previous


def worth_routing(a: Tensor, b: Tensor) -> bool:
    """Large enough for oneDNN to pay off, float32 on the CPU, and oneDNN exact here (or bfloat16 asked for)."""
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    return (
        k >= MIN_INNER
        and m * k * n >= MIN_MACS_PER_MEMBER
        and a.dtype == torch.float32
        and a.device.type == "cpu"
        and (_precision == "bf16" or use_onednn())
    )


class _RoutedAffine(torch.autograd.Function):
    """bias + a @ b with the backward's products routed like the forward's (autograd's own backward of
    `torch.baddbmm` would run them on MKL in float32: with precision=bf16, two thirds of a layer's products)."""

    @staticmethod
    def forward(ctx, bias: Tensor, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, b)
        return baddbmm(bias, a, b)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, b = ctx.saved_tensors
        grad_bias = g.sum(1, keepdim=True) if ctx.needs_input_grad[0] else None
        grad_a = bmm(g, b.transpose(1, 2)) if ctx.needs_input_grad[1] else None
        grad_b = bmm(a.transpose(1, 2), g) if ctx.needs_input_grad[2] else None
        return grad_bias, grad_a, grad_b


def affine(bias: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """bias [K, 1, N] + a [K, M, I] @ b [K, I, N], differentiable, on the kernel `bmm` picks for the forward and,
    under autograd, for the backward's products too. Where nothing is routed it is `baddbmm` (no Python
    autograd function: its cost per call matters to small networks)."""
    if torch.is_grad_enabled() and (bias.requires_grad or a.requires_grad or b.requires_grad) and worth_routing(a, b):
        return _RoutedAffine.apply(bias, a, b)  # type: ignore[no-any-return]
    return baddbmm(bias, a, b)


class _RoutedLinear(torch.autograd.Function):
    """nn.Linear's forward (MKL), its backward's two products routed like `bmm`'s."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = _routed_mm(g, weight) if ctx.needs_input_grad[0] else None
        grad_weight = _routed_mm(g.t(), x) if ctx.needs_input_grad[1] else None
        grad_bias = g.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def _routed_mm(a: Tensor, b: Tensor) -> Tensor:
    return bmm(a[None], b[None])[0]


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """`torch.nn.functional.linear(x, weight, bias)`, and under autograd for 2-D float32 x outside autocast, its
    backward's products on the kernel `bmm` picks: for the Nature-CNN's feature layer ([256, 3136] inputs, 512
    outputs) 1-3% of the encoder's step on an AMD EPYC Zen 4 (`benchmarks/atari.py --layout`). The forward stays
    on MKL: oneDNN reorders the transposed weight on every call, which made a one-row acting pass slower."""
    if (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad or bias.requires_grad)
        and x.dim() == 2
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled(x.device.type)
    ):
        return _RoutedLinear.apply(x, weight, bias)  # type: ignore[no-any-return]
    return torch.nn.functional.linear(x, weight, bias)


def bmm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """`torch.bmm(a, b, out=out)` on the faster exact kernel."""
    if worth_routing(a, b):
        call = _bf16_call if _precision == "bf16" else _onednn_call
        return call(torch.bmm, a, b, out=out)
    return torch.bmm(a, b, out=out)


def baddbmm(bias: Tensor, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """`torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)` on the faster exact kernel.

    With beta = alpha = 1 and more than one row it is `bmm(a, b) + bias`, the bias added in place after the
    product, on either kernel: baddbmm first copies the broadcast bias into the output and the product then
    reads it back. On MKL that copy was about 0.2 ms of IQL's 5 ms step (1 thread, Intel Xeon; there the result
    is bit for bit baddbmm's, which adds C after forming the product); oneDNN's baddbmm makes the same copy.
    Single rows go to a kernel that accumulates onto C, so they stay on baddbmm."""
    if beta == 1.0 and alpha == 1.0 and a.shape[-2] > 1:
        return bmm(a, b).add_(bias)
    if worth_routing(a, b):
        call = _bf16_call if _precision == "bf16" else _onednn_call
        return call(torch.baddbmm, bias, a, b, beta=beta, alpha=alpha)
    return torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)

"""The single-call timings behind choices in policylab's numpy and torch code (median us per call, 1 thread
unless said): which form of a reduction or product is fastest at the shapes where policylab uses it.

    .venv/bin/python benchmarks/small_ops.py

- `ope/estimators.py`: column means of [n, K] (`mean(axis=0)` against `einsum("ij->j")`), row sums of a
  product (`(w * t).sum(axis=1)` against `einsum("ij,ij->i")`), discounted sums of one-step episodes
  (`x @ d` of an [n, 1] array against a multiply); at 1e6 logged steps, the cumulative log weight summed in
  place against into a new array, PDIS's sum_t d_t w_t r_t as `(w * r) @ d` against one three-operand
  einsum, and the bootstrap's resample counts drawn a chunk of 16 resamples at once against one at a time;
- `llm/fast_decode.NumpyDecoder`: numpy's product with a transposed weight view against a contiguous copy;
- `llm/fast_decode.softmax` and `llm/fast_train._softmax_backward`: the attention softmax and its backward at a
  tiny Llama's training and sampling shapes, torch's kernels against the numpy code;
- `runtime.limit_numpy_blas`: numpy's BLAS on its default threads against 1 thread, with a busy process on
  another core (a 64x64 by 64x384 product, as in sampling);
- `nets/matmul.py` (Intel's MKL): a batched product with one output column (2 members) against one 2-D
  product of all rows.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import timeit
from collections.abc import Callable

import numpy as np
import torch
from common import HelpFormatter


def us(fn: Callable[[], object], number: int = 200, repeat: int = 5) -> float:
    fn()
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def line(label: str, *pairs: tuple[str, float]) -> None:
    print(f"{label:<44} " + "   ".join(f"{name} {value:8.1f} us" for name, value in pairs))


def reductions() -> None:
    rng = np.random.default_rng(0)
    for n, k in ((10_000, 10), (100_000, 10), (100_000, 1)):
        reductions_at(rng.random((n, k)), rng.random((n, k)))
    x, d = rng.random((100_000, 1)), np.ones(1)
    line("discounted sum [100000, 1]", ("x @ d", us(lambda: x @ d)), ("multiply", us(lambda: x[:, 0] * d[0])))


def reductions_at(x: np.ndarray, y: np.ndarray) -> None:
    n, k = x.shape
    line(f"column means [{n}, {k}]", ("mean(axis=0)", us(lambda: x.mean(axis=0))),
         ("einsum", us(lambda: np.einsum("ij->j", x) / n)))  # fmt: skip
    line(f"row sums of a product [{n}, {k}]", ("(w * t).sum(axis=1)", us(lambda: (x * y).sum(axis=1))),
         ("einsum", us(lambda: np.einsum("ij,ij->i", x, y))))  # fmt: skip


def pdis_arrays() -> None:
    """PDIS's arithmetic at 1e6 logged steps, each call on its own copy of the input (made outside the timing)."""
    rng = np.random.default_rng(0)
    n, h = 10_000, 100
    w, r, d = rng.random((n, h)), rng.random((n, h)), 0.99 ** np.arange(h)

    def fresh_us(setup: Callable[[], tuple], fn: Callable[..., object], repeat: int = 30) -> float:
        times = []
        for _ in range(repeat):
            args = setup()
            start = timeit.default_timer()
            fn(*args)
            times.append(timeit.default_timer() - start)
        return statistics.median(times) * 1e6

    ratios = torch.from_numpy(rng.normal(0, 0.05, (n, h)))
    line(f"cumulative sum along rows [{n}, {h}]",
         ("into a new array", fresh_us(lambda: (ratios.clone(),), lambda x: torch.cumsum(x, dim=1))),
         ("in place", fresh_us(lambda: (ratios.clone(),), lambda x: x.cumsum_(dim=1))))  # fmt: skip
    line(f"PDIS sum_t d_t w_t r_t [{n}, {h}]", ("(w * r) @ d", fresh_us(lambda: (), lambda: (w * r) @ d)),
         ("einsum ij,ij,j->i", fresh_us(lambda: (), lambda: np.einsum("ij,ij,j->i", w, r, d))))  # fmt: skip


def resample_counts() -> None:
    """ope/bootstrap.resample_counts at n = 1e6: 16 resamples' draws at once, then counted, against each drawn and
    counted on its own (the same numbers)."""
    n, b = 1_000_000, 16

    def at_once() -> None:
        draws = np.random.default_rng(0).integers(0, n, size=(b, n))
        counts = np.empty((b, n), np.float32)
        for row in range(b):
            counts[row] = np.bincount(draws[row], minlength=n)

    def one_at_a_time() -> None:
        rng, counts = np.random.default_rng(0), np.empty((b, n), np.float32)
        for row in range(b):
            counts[row] = np.bincount(rng.integers(0, n, size=n), minlength=n)

    line(f"resample counts, n = {n}, per resample", ("chunk at once", us(at_once, 1, 5) / b),
         ("one at a time", us(one_at_a_time, 1, 5) / b))  # fmt: skip


def numpy_products() -> None:
    rng = np.random.default_rng(0)
    h, w = rng.random((16, 64), np.float32), rng.random((192, 64), np.float32)  # w stored [out, in]
    w_t = np.ascontiguousarray(w.T)
    line("numpy 16x64 @ 64x192", ("transposed view", us(lambda: h @ w.T, 2000)), ("copy", us(lambda: h @ w_t, 2000)))


def attention_softmax() -> None:
    """Scores [rows, heads, 1, queries, keys]: SFT's prompts (64 x 6 by 6), completions of 8 tokens after 14 (GRPO's
    training pass) and one decoded token over 12 keys (sampling)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for shape in ((64, 4, 1, 6, 6), (128, 4, 1, 8, 14), (16, 4, 1, 1, 12)):
        attention_softmax_at(rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32))


def attention_softmax_at(scores: np.ndarray, grad: np.ndarray) -> None:
    from policylab.llm.fast_decode import softmax
    from policylab.llm.fast_train import _softmax_backward

    probs = softmax(scores)
    torch_scores, torch_grad, torch_probs = (torch.from_numpy(x) for x in (scores, grad, probs))
    shape = list(scores.shape)
    line(f"softmax {shape}", ("torch", us(lambda: torch.softmax(torch_scores, -1).numpy(), 1000)),
         ("numpy", us(lambda: softmax(scores), 1000)))  # fmt: skip
    backward = torch._softmax_backward_data
    line(f"softmax backward {shape}",
         ("torch", us(lambda: backward(torch_grad, torch_probs, -1, torch.float32).numpy(), 1000)),
         ("numpy", us(lambda: _softmax_backward(grad, probs), 1000)))  # fmt: skip


def blas_threads() -> None:
    from threadpoolctl import threadpool_limits

    x, w = np.random.rand(64, 64).astype(np.float32), np.random.rand(64, 384).astype(np.float32)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        default = us(lambda: x @ w, 2000)
        with threadpool_limits(limits=1, user_api="blas"):
            one = us(lambda: x @ w, 2000)
    finally:
        spinner.kill()
    line("numpy 64x64 @ 64x384, another core busy", ("default threads", default), ("1 thread", one))


def one_column_products() -> None:
    torch.set_num_threads(1)
    a, v = torch.randn(2, 256, 256), torch.randn(2, 256, 1)
    flat, v0 = a.reshape(512, 256), v[0]
    line("torch (2,256,256) x (2,256,1)", ("bmm", us(lambda: torch.bmm(a, v), 2000)),
         ("2-D 512x256x1", us(lambda: torch.mm(flat, v0), 2000)))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.parse_args()  # no options: --help describes what runs
    reductions()
    pdis_arrays()
    resample_counts()
    numpy_products()
    attention_softmax()
    blas_threads()
    one_column_products()


if __name__ == "__main__":
    main()

"""Adam, RAdam and RMSprop without torch.optim: the same arithmetic as `torch.optim.Adam(fused=True)`,
`torch.optim.RAdam` and `torch.optim.RMSprop(foreach=True)`, less overhead.

Two costs of torch.optim matter for small, short runs: constructing any
torch.optim optimizer imports torch._dynamo (about 1.2 s on the benchmark
machine, paid by every process), and `Adam.step` spends about 90 us of Python
per call around a 10 us fused kernel. This class calls the same fused kernel
on prebuilt tensor lists (bit-identical results: tests/test_optim.py), keeps
torch's `state_dict` layout, and falls back to a foreach implementation where
the fused kernel is not available.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor


class _OneGroupOptimizer:
    """What policylab's optimizers share: one parameter group, per-parameter state tensors created at the first
    step, and torch.optim's `state_dict` layout (so checkpoints of either read the same way)."""

    STATE: tuple[str, ...] = ()
    """The per-parameter state tensors besides the step count."""

    def __init__(self, params: Iterable[torch.nn.Parameter], **group: Any) -> None:
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got no parameters")
        self.param_groups: list[dict[str, Any]] = [{"params": params, **group}]
        self.state: dict[torch.nn.Parameter, dict[str, Tensor]] = {}

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.param_groups[0]["params"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self) -> None:
        if torch.is_grad_enabled():
            with torch.no_grad():
                self._step()
        else:
            self._step()

    def _step(self) -> None:
        raise NotImplementedError

    def _with_grads(self) -> tuple[list[torch.nn.Parameter], list[dict[str, Tensor]]]:
        """The parameters that have a gradient and their state (created at the first step)."""
        params = self.params
        if any(p.grad is None for p in params):
            params = [p for p in params if p.grad is not None]
        if len(self.state) < len(self.params):  # some parameter has no state yet: its first gradient
            for p in params:
                if p not in self.state:
                    self.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32, device=p.device),
                        **{key: torch.zeros_like(p, memory_format=torch.preserve_format) for key in self.STATE},
                    }
        return params, [self.state[p] for p in params]

    def state_dict(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(self.params)}
        group = {k: list(v) if isinstance(v, tuple) else v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        return {"state": {index[p]: dict(s) for p, s in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's layout: that of a checkpoint written by this class or by its torch.optim twin."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError("optimizer state does not match the parameters (a different network?)")
        group = self.param_groups[0]
        for key, value in group.items():
            if key != "params" and key in groups[0]:
                group[key] = tuple(groups[0][key]) if isinstance(value, tuple) else groups[0][key]
        self.state = {}
        for idx, s in state_dict["state"].items():
            p = self.params[int(idx)]
            self.state[p] = {
                "step": torch.as_tensor(s["step"]).to(dtype=torch.float32, device=p.device).reshape(()).clone(),
                **{key: s[key].to(p.device).clone() for key in self.STATE},
            }


class Adam(_OneGroupOptimizer):
    STATE = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
    ) -> None:
        """`decoupled_weight_decay`: AdamW (torch.optim.AdamW's arithmetic: each parameter is multiplied by
        1 - lr * weight_decay before Adam's step); otherwise weight decay is an L2 term added to the gradients."""
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._fused = hasattr(torch, "_fused_adam_")
        self.decoupled = decoupled_weight_decay

    def _step(self) -> None:
        group = self.param_groups[0]
        params, states = self._with_grads()
        if not params:
            return
        if self.decoupled and group["weight_decay"]:
            torch._foreach_mul_(list[Tensor](params), 1.0 - group["lr"] * group["weight_decay"])
            group = {**group, "weight_decay": 0.0}
        grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        if self._fused and all(p.dtype == torch.float32 for p in params):
            torch._fused_adam_(  # type: ignore[call-overload]
                params,  # type: ignore[arg-type]
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                amsgrad=False,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )
            # the fused kernel writes the parameters without bumping their version counters (torch.optim's
            # wrapper does): bump them, so that whatever checks for in-place changes (autograd's saved tensors,
            # llm/fast_train's sampler tape) sees this update
            torch.autograd.graph.increment_version(params)
            return
        self._foreach_step(params, grads, exp_avgs, exp_avg_sqs, steps, group)  # type: ignore[arg-type]

    @staticmethod
    def _foreach_step(
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
        group: dict[str, Any],
    ) -> None:
        beta1, beta2 = group["betas"]
        if group["weight_decay"]:
            grads = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        for p, m, v, t in zip(params, exp_avgs, exp_avg_sqs, steps):
            n = float(t)
            step_size = group["lr"] / (1 - beta1**n)
            denom = (v.sqrt() / math.sqrt(1 - beta2**n)).add_(group["eps"])
            p.addcdiv_(m, denom, value=-step_size)


class RAdam(_OneGroupOptimizer):
    """torch.optim.RAdam (Liu et al. 2020) without weight decay, the same arithmetic as its single-tensor path
    (tests/test_optim.py): Adam's moments, and while the variance estimate's degrees of freedom rho_t are at most 5
    an unadapted step lr m_hat; after that Adam's adaptive step times the rectification
    r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t)). PQN's optimizer."""

    STATE = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps)

    def _step(self) -> None:
        group = self.param_groups[0]
        params, states = self._with_grads()
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        rho_inf = 2 / (1 - beta2) - 1
        for p, s in zip(params, states, strict=True):
            grad = p.grad
            assert grad is not None
            s["step"] += 1
            step = float(s["step"])
            s["exp_avg"].lerp_(grad, 1 - beta1)
            s["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            corrected = s["exp_avg"] / bias_correction1
            rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
            if rho_t > 5.0:
                rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
                adaptive = (bias_correction2**0.5) / s["exp_avg_sq"].sqrt().add_(eps)
                p.add_(corrected * lr * adaptive * rect, alpha=-1.0)
            else:
                p.add_(corrected * lr, alpha=-1.0)


class RMSprop(_OneGroupOptimizer):
    """torch.optim.RMSprop(foreach=True) without momentum, centering or weight decay (A2C's, as SB3's), the same
    arithmetic bit for bit (tests/test_optim.py): square_avg = alpha square_avg + (1 - alpha) g^2, then
    p -= lr g / (sqrt(square_avg) + eps)."""

    STATE = ("square_avg",)

    def __init__(
        self, params: Iterable[torch.nn.Parameter], lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8
    ) -> None:
        super().__init__(params, lr=lr, alpha=alpha, eps=eps)

    def _step(self) -> None:
        group = self.param_groups[0]
        params, states = self._with_grads()
        if not params:
            return
        grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
        square_avgs = [s["square_avg"] for s in states]
        torch._foreach_add_([s["step"] for s in states], 1)
        torch._foreach_mul_(square_avgs, group["alpha"])
        torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - group["alpha"])
        denominators = torch._foreach_sqrt(square_avgs)
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_addcdiv_(params, grads, denominators, value=-group["lr"])  # type: ignore[arg-type]


class ParameterBuffer:
    """A module's parameters as views of one flat tensor, and their gradients as views of another.

    With the parameters in one buffer, zeroing the gradients, the global gradient
    norm, clipping and the optimizer step are each one operator call on one
    tensor instead of one per parameter tensor. The module's parameters stay
    ordinary `nn.Parameter`s (state_dict and load_state_dict work as before);
    give the optimizer `[buffer.flat]`. Gradients are zeroed in place, never set
    to None, so autograd accumulates into the views.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], with_grad: bool = True) -> None:
        """`with_grad=False` (e.g. a target network): flat parameters only, which then do not require grad."""
        self.params = list(params)
        first = self.params[0]
        total = sum(p.numel() for p in self.params)
        self.flat = torch.nn.Parameter(torch.empty(total, dtype=first.dtype, device=first.device), with_grad)
        self.grad = torch.zeros(total if with_grad else 0, dtype=first.dtype, device=first.device)
        self._grad_view: np.ndarray | None = None
        self._grad_view_ptr = 0
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                self.flat[offset : offset + n].copy_(p.reshape(-1))
                p.data = self.flat.data[offset : offset + n].view_as(p)
                if with_grad:
                    p.grad = self.grad[offset : offset + n].view_as(p)
                else:
                    p.requires_grad_(False)
                offset += n
        if with_grad:
            self.flat.grad = self.grad

    def zero_grad(self) -> None:
        self.grad.zero_()

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale the gradients so that their global L2 norm is at most `max_norm`; returns the norm before.

        The same arithmetic as torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), at most 1).
        On the CPU the norm is read on the host (no device to wait for there): one numpy dot product on a
        view of the gradients instead of six torch calls, and no scaling pass at all when the norm is within
        the bound.
        """
        if self.grad.device.type != "cpu" or self.grad.dtype not in (torch.float32, torch.float64):
            total = torch.linalg.vector_norm(self.grad)
            self.grad.mul_(torch.clamp_max(max_norm / (total + 1e-6), 1.0))
            return total
        grad = self._grad_numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run: inf, which the NaN check reports
            norm = math.sqrt(float(np.dot(grad, grad)))
        if norm + 1e-6 > max_norm:
            self.grad.mul_(max_norm / (norm + 1e-6))
        return torch.full((), norm, dtype=self.grad.dtype)

    def _grad_numpy(self) -> np.ndarray:
        """A numpy view of the flat gradients (CPU), rebuilt if the buffer was replaced."""
        if self._grad_view is None or self._grad_view_ptr != self.grad.data_ptr():
            self._grad_view, self._grad_view_ptr = self.grad.numpy(), self.grad.data_ptr()
        return self._grad_view


Optimizer = Union[torch.optim.Optimizer, Adam, RAdam, RMSprop]
"""What the algorithms accept: policylab's Adam, RAdam and RMSprop, or any torch.optim optimizer."""


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, max_steps: int = 15, residual_tol: float = 1e-10
) -> Tensor:
    """An approximate solution x of A x = b for a symmetric positive-definite A given only as `matvec`
    (x -> A x), by at most `max_steps` conjugate-gradient iterations from x = 0 (Nocedal & Wright, Alg. 5.2).

    Stops early once the squared residual is below `residual_tol`: one host sync per iteration, which
    TRPO pays anyway for its line search (and which saves the remaining matrix-vector products)."""
    x = torch.zeros_like(b)
    r = b.clone()  # residual b - A x
    p = b.clone()  # search direction
    rr = torch.dot(r, r)
    for _ in range(max_steps):
        if float(rr) < residual_tol:
            break
        ap = matvec(p)
        alpha = rr / torch.dot(p, ap)
        x.add_(alpha * p)
        r.sub_(alpha * ap)
        rr_next = torch.dot(r, r)
        p = r + (rr_next / rr) * p
        rr = rr_next
    return x

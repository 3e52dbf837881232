"""The fast path of the actor-critic update: analytic gradients instead of autograd.

On small networks an autograd step is all operator-call overhead (about 150
calls for a 64x64 actor-critic, most of them on 256-element tensors). This
step computes the same gradients by hand in about 50 calls: the MLP's forward
keeps its activations (`StackedMLP.forward_cached`), the loss gradients come
from `pg_surrogate_grad` / `value_loss_grad` and the head's `grad`, and the
MLP's backward writes `.grad` in place (views of one flat buffer,
`ParameterBuffer`), so clipping and the fused Adam step are single-tensor
operations. tests/test_fused.py checks it against autograd for every option
it accepts; anything else (other activations, tanh-squashed Gaussians) takes
the autograd path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from policylab.algos.onpolicy import step_logit_bias
from policylab.data import Batch
from policylab.nets import ActorCritic
from policylab.nets.actor_critic import masked
from policylab.nets.sde import sde_log_std_grad
from policylab.objectives import pg_surrogate_grad, value_loss_grad
from policylab.objectives.imitation import imitation_logp_grad, imitation_loss
from policylab.optim import Optimizer, ParameterBuffer

if TYPE_CHECKING:
    from policylab.algos.onpolicy import ActorCriticLoss, ImitationTerm


class FusedActorCriticStep:
    def __init__(
        self, net: ActorCritic, params: ParameterBuffer, optimizer: Optimizer, max_grad_norm: float | None
    ) -> None:
        self.net = net
        self.params = params
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self._grad_out: dict[int, Tensor] = {}

    @staticmethod
    def supports(net: torch.nn.Module) -> bool:
        return (
            isinstance(net, ActorCritic)
            and net.encoder is None
            and not net.recurrent
            and net.body.analytic_backward
            and not (net.head.continuous and net.head.squash)  # type: ignore[union-attr]
        )

    def __call__(
        self,
        batch: Batch,
        loss: ActorCriticLoss,
        *,
        kl_limit: float | None = None,
        with_metrics: bool = True,
        imitation: ImitationTerm | None = None,
    ) -> tuple[dict[str, Tensor], bool]:
        """One gradient step (see `StepFn`). With `kl_limit` the step is skipped when the approximate KL
        exceeds it; `with_metrics=False` skips the loss values (the gradient is the same)."""
        with torch.no_grad():
            return self._step(batch, loss, kl_limit, with_metrics or kl_limit is not None, imitation)

    def _step(
        self,
        batch: Batch,
        spec: ActorCriticLoss,
        kl_limit: float | None,
        with_metrics: bool,
        imitation: ImitationTerm | None,
    ) -> tuple[dict[str, Tensor], bool]:
        """The demonstration rows of `imitation` go through the same forward and backward as the on-policy rows:
        their gradient w.r.t. log-probs is the imitation term's, and they take no value or entropy gradient."""
        net, n_out = self.net, self.net.n_outputs
        obs, actions, size = batch.obs, batch.actions, batch.obs.shape[0]
        if imitation is not None:
            obs, actions = torch.cat([obs, imitation.batch.obs]), torch.cat([actions, imitation.batch.actions])
        out, cache = net.body.forward_cached(obs.reshape(obs.shape[0], net.obs_dim))
        bias = step_logit_bias(batch, imitation)
        policy_out = masked(out[0, :, :n_out], bias)  # d(out + bias)/d out = 1: the gradient is unchanged
        all_values = out[0, :, n_out] if net.shared else out[1, :, 0]
        hidden = cache[-1][0]  # the actor's last hidden features (gSDE's)
        row_log_std = net.row_log_std(hidden)
        all_logp, all_entropy, head_cache = net.head.log_prob_entropy_cached(
            policy_out, row_log_std, actions, need_entropy=with_metrics or spec.ent_coef != 0.0,
            masked=bias is not None,
        )  # fmt: skip
        logp, values = all_logp[:size], all_values[:size]
        entropy = None if all_entropy is None else all_entropy[:size]
        coef = 0.0 if imitation is None else imitation.coef
        old_logp = batch.get("logp")
        pg_loss, g_logp, metrics = pg_surrogate_grad(
            logp,
            logp if old_logp is None else old_logp,
            batch.advantages,
            **spec.surrogate_options(),
            scale=1.0 - coef,
            with_metrics=with_metrics,
        )
        if kl_limit is not None and metrics["approx_kl"].item() > kl_limit:
            return metrics, False
        v_loss, g_values = value_loss_grad(
            values,
            batch.returns,
            old_values=batch.get("values"),
            clip=spec.clip_value,
            scale=spec.vf_coef,
            with_loss=with_metrics,
        )
        entropy_weight = -spec.ent_coef / size
        g_entropy: float | Tensor = entropy_weight
        if imitation is not None:
            demo_logp = all_logp[size:]
            weights = imitation.weights(demo_logp, all_values[size:])
            g_logp = torch.cat([g_logp, imitation_logp_grad(weights, coef)])
            g_values = torch.cat([g_values, torch.zeros_like(demo_logp)])
            if spec.ent_coef != 0.0:
                g_entropy = torch.cat([torch.full_like(logp, entropy_weight), torch.zeros_like(demo_logp)])
            if with_metrics:
                metrics.update(imitation_loss=imitation_loss(demo_logp, weights), imitation_coef=torch.tensor(coef))
        g_policy, g_log_std = net.head.grad(head_cache, g_logp, g_entropy)
        if net.sde and g_log_std is not None:  # through log sigma(s) into the [features, A] parameter
            g_log_std = sde_log_std_grad(hidden, row_log_std, g_log_std, net.log_std)  # type: ignore[arg-type]
        g_out = self._zeros_like(out)
        g_out[0, :, :n_out] = g_policy
        if net.shared:
            g_out[0, :, n_out] = g_values
        else:
            g_out[1, :, 0] = g_values
        net.body.backward(cache, g_out)
        if g_log_std is not None:
            net.log_std.grad.copy_(g_log_std)  # type: ignore[union-attr]  # a view of the flat gradient buffer
        grad_norm = self.params.clip_grad_norm_(self.max_grad_norm) if self.max_grad_norm is not None else None
        self.optimizer.step()
        if with_metrics:
            ent = entropy.mean()  # type: ignore[union-attr]
            policy_loss = pg_loss
            if imitation is not None:
                policy_loss = (1.0 - coef) * pg_loss + coef * metrics["imitation_loss"]  # type: ignore[operator]
            metrics["loss"] = policy_loss + spec.vf_coef * v_loss - spec.ent_coef * ent  # type: ignore[operator]
            metrics.update(policy_loss=pg_loss, value_loss=v_loss, entropy=ent)  # type: ignore[arg-type]
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
        return metrics, True

    def value_step(self, obs: Tensor, returns: Tensor, with_metrics: bool = True) -> Tensor | None:
        """One optimizer step on (V - R)^2 through the critic's member alone (separate actor and critic
        networks): the same gradient as `__call__` with zero advantages, no entropy and vf_coef 1 (TRPO's
        critic fit), without the actor's forward, head and backward. The actor's gradient entries are left as
        they are: the caller zeroes them (`params.zero_grad()`) once before its value steps. Returns the loss
        (None without metrics)."""
        net = self.net
        assert not net.shared, "value_step needs separate actor and critic networks"
        with torch.no_grad():
            critic = slice(1, 2)
            out, cache = net.body.forward_cached(obs.reshape(obs.shape[0], net.obs_dim), members=critic)
            v_loss, g_values = value_loss_grad(out[0, :, 0], returns, with_loss=with_metrics)
            g_out = self._zeros_like(out)
            g_out[0, :, 0] = g_values
            net.body.backward(cache, g_out, members=critic)
            if self.max_grad_norm is not None:
                self.params.clip_grad_norm_(self.max_grad_norm)
            self.optimizer.step()
        return v_loss

    def _zeros_like(self, out: Tensor) -> Tensor:
        """A preallocated zero gradient for the output: the slices written each step cover every used entry."""
        key = out.shape[1]
        buf = self._grad_out.get(key)
        if buf is None or buf.shape != out.shape:
            buf = self._grad_out[key] = torch.zeros_like(out)
        return buf

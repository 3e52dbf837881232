"""The Decision Transformer's network (Chen et al. 2021, arXiv:2106.01345): a causal transformer over the tokens
(R_1, s_1, a_1, R_2, s_2, a_2, ...) of a window of K steps, R_t the return still to collect from step t on. Each
step's action is predicted from the output at its observation token, which attends to the returns, observations
and actions before it and to its own return, never to its own action. As in the authors' code and CORL's: GPT
blocks with LayerNorm before attention and the MLP, a learned embedding of the step's timestep within its episode
added to its three tokens (no other position embedding), LayerNorm after the embeddings, and tanh on Box actions.

Training reads windows [B, K, ...] (`ReplayBuffer.windows`, padded after an episode's last step: the causal mask
keeps the padding out of every real step's prediction, and the loss masks its own). Acting keeps each env's last K
steps (its context): `env_action` appends the observation with the return still wanted (the target return less
the rewards observed so far, `observe_rewards`) and reads the action at its position; `reset_memory` starts an
env's context over. The context is not part of the module's state (nothing of it is saved).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policylab.nets import matmul
from policylab.nets.critics import scale_to_bounds


class DropoutMasks:
    """Dropout's keep masks for one training step, already scaled by 1 / P(keep) (inverted dropout), drawn from
    the run's generator so that a resumed run draws the same ones. On the CPU, 16 random bits per element from a
    numpy PCG64 seeded by one draw of the generator: much faster than torch's `bernoulli_` there (one draw per
    element of a sequential Mersenne twister), with P(drop) = round(p * 65536) / 65536 (within 8e-6 of p).
    Elsewhere, `bernoulli_` with the generator."""

    def __init__(self, p: float, generator: torch.Generator) -> None:
        self.p, self.generator = p, generator
        self.rng: np.random.Generator | None = None
        if generator.device.type == "cpu":
            seed = int(torch.randint(2**62, (1,), generator=generator))
            self.rng = np.random.Generator(np.random.PCG64(seed))
            self.threshold = round(p * 65536)
            self.scale = 65536 / (65536 - self.threshold)
        else:
            self.scale = 1.0 / (1.0 - p)

    def __call__(self, like: Tensor) -> Tensor:
        """A mask of `like`'s shape: 0 (dropped) or 1 / P(keep)."""
        if self.rng is None:
            keep = torch.empty_like(like).bernoulli_(1.0 - self.p, generator=self.generator)
            return keep.mul_(self.scale)
        bits = np.frombuffer(self.rng.bytes(2 * like.numel()), np.uint16).reshape(like.shape)
        return torch.from_numpy(np.multiply(bits >= self.threshold, np.float32(self.scale), dtype=np.float32))


def plus_dropped(x: Tensor, branch: Tensor, masks: DropoutMasks | None) -> Tensor:
    """x + dropout(branch), in one pass (addcmul) while training."""
    return x + branch if masks is None else torch.addcmul(x, branch, masks(branch))


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


def dense(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """`F.linear`; while training, its products forward and backward on the kernel nets/matmul.py picks for
    float32 (oneDNN's AVX-512 one on AMD processors that have it, MKL elsewhere: the same results within float32
    rounding)."""
    if not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    rows, columns = x.reshape(1, -1, x.shape[-1]), weight.t().unsqueeze(0)
    if not matmul.worth_routing(rows, columns):  # MKL's addmm through F.linear: faster than bmm + bias there
        return F.linear(x, weight, bias)
    return matmul.affine(bias.view(1, 1, -1), rows, columns).view(*x.shape[:-1], -1)


class Dense(nn.Linear):
    """nn.Linear through `dense`."""

    def forward(self, x: Tensor) -> Tensor:
        return dense(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.qkv = Dense(dim, 3 * dim)
        self.proj = Dense(dim, dim)
        self.heads = heads

    def forward(self, x: Tensor, masks: DropoutMasks | None = None, queries: slice | None = None) -> Tensor:
        """Causal attention of the tokens `queries` (all by default) over every token up to each; attention
        weights dropped with `masks` while training (acting takes the fused kernel)."""
        b, t, c = x.shape
        split = (b, -1, self.heads, c // self.heads)
        if queries is None:
            q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            positions = torch.arange(t, device=x.device)
        else:  # keys and values of all tokens, queries of some (the last block's observation tokens)
            weight, bias = self.qkv.weight, self.qkv.bias
            k, v = dense(x, weight[c:], bias[c:]).view(b, t, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
            q = dense(x[:, queries], weight[:c], bias[:c]).view(split).transpose(1, 2)
            positions = torch.arange(t, device=x.device)[queries]
        allowed = positions.unsqueeze(1) >= torch.arange(t, device=x.device)  # [queries, t]
        if masks is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // self.heads))
            weights = scores.masked_fill_(~allowed, -math.inf).softmax(-1)
            y = (weights * masks(weights)) @ v
        return self.proj(y.transpose(1, 2).reshape(b, -1, c))


class Block(nn.Module):
    """x + attention(LN(x)), then + MLP(LN(x)) (4x wide), each residual branch dropped while training."""

    def __init__(self, dim: int, heads: int, activation: str) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(Dense(dim, 4 * dim), ACTIVATIONS[activation](), Dense(4 * dim, dim))

    def forward(self, x: Tensor, masks: DropoutMasks | None = None, queries: slice | None = None) -> Tensor:
        """The block's output at the tokens `queries` (all by default; the others' outputs are not computed)."""
        attended = self.attn(self.ln1(x), masks, queries)
        x = plus_dropped(x if queries is None else x[:, queries], attended, masks)
        return plus_dropped(x, self.mlp(self.ln2(x)), masks)


class DecisionTransformer(nn.Module):
    """Box actions: predictions in [-1, 1] (the replay buffer's units; `env_action` scales them to the bounds).
    Discrete actions: logits over the n actions (actions enter as an embedding)."""

    low: Tensor
    high: Tensor

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        n_actions: int,
        low: Tensor | None,
        high: Tensor | None,
        *,
        context: int = 20,
        embed_dim: int = 128,
        layers: int = 3,
        heads: int = 1,
        dropout: float = 0.1,
        activation: str = "relu",
        max_timestep: int = 1000,
        target_return: float = 0.0,
        reward_scale: float = 1.0,
    ) -> None:
        """`act_dim` for Box actions (n_actions 0), `n_actions` for Discrete ones (act_dim 0). The return
        embedding reads returns as the replay buffer holds them, sums of r * reward_scale; `target_return` is in
        the env's own units."""
        super().__init__()
        self.discrete = n_actions > 0
        self.act_dim, self.n_actions = act_dim, n_actions
        self.context, self.max_timestep = context, max_timestep
        self.dropout = dropout
        self.target_return, self.reward_scale = target_return, reward_scale
        self.register_buffer("low", (low if low is not None else torch.zeros(0)).reshape(-1).float())
        self.register_buffer("high", (high if high is not None else torch.zeros(0)).reshape(-1).float())
        self.embed_obs = nn.Linear(obs_dim, embed_dim)
        self.embed_action: nn.Module = (
            nn.Embedding(n_actions, embed_dim) if self.discrete else nn.Linear(act_dim, embed_dim)
        )
        self.embed_return = nn.Linear(1, embed_dim)
        self.embed_timestep = nn.Embedding(max_timestep, embed_dim)
        self.embed_norm = nn.LayerNorm(embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, heads, activation) for _ in range(layers))
        self.out_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, n_actions if self.discrete else act_dim)
        self.apply(_gpt_init)
        self._context: dict[str, Tensor] | None = None
        """Acting: per env, its last `context` steps (obs, actions, returns, timesteps), its steps in the context
        (`length`), its episode's steps so far (`t`) and the return it still wants (`wanted`)."""

    def forward(
        self, obs: Tensor, actions: Tensor, returns: Tensor, timesteps: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """[B, K, ...] windows -> [B, K, A]: each step's predicted action (Box, in [-1, 1]) or its action logits
        (Discrete). `generator`: dropout is on, drawn from it (training); None: off (acting, evaluation). The last
        block computes its output at the observation tokens only: nothing reads the others'."""
        b, k = returns.shape
        masks = DropoutMasks(self.dropout, generator) if generator is not None and self.dropout > 0 else None
        time = self.embed_timestep(timesteps.clamp(0, self.max_timestep - 1))
        acts = self.embed_action(actions.long()) if self.discrete else self.embed_action(actions)
        tokens = torch.stack(
            (self.embed_return(returns.unsqueeze(-1)) + time, self.embed_obs(obs.flatten(2)) + time, acts + time), 2
        ).reshape(b, 3 * k, -1)
        x = self.embed_norm(tokens)
        x = x if masks is None else x * masks(x)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, masks, slice(1, None, 3) if i == last else None)
        out = self.head(self.out_norm(x))
        return out if self.discrete else torch.tanh(out)

    # acting ----------------------------------------------------------------------------------------------------

    def reset_memory(self, ended: np.ndarray | None = None) -> None:
        """Start over the context of every env (None) or of the envs where `ended` is true."""
        if self._context is None:
            return
        if ended is None:
            self._context = None
        elif bool(np.any(ended)):
            with torch.inference_mode():  # the context was made while acting, in inference mode
                rows = torch.as_tensor(np.asarray(ended, bool), device=self.low.device)
                ctx = self._context
                ctx["length"][rows] = 0
                ctx["t"][rows] = 0
                ctx["wanted"][rows] = self.target_return * self.reward_scale

    def observe_rewards(self, rewards: np.ndarray) -> None:
        """The rewards the last actions earned: the return each env still wants drops by them (in the units
        the network learned returns in)."""
        if self._context is None:
            return
        with torch.inference_mode():
            earned = torch.as_tensor(np.asarray(rewards, np.float32), device=self.low.device)
            self._context["wanted"] -= earned * self.reward_scale

    def _new_context(self, n: int, obs: Tensor) -> dict[str, Tensor]:
        k, device = self.context, obs.device
        action_shape = () if self.discrete else (self.act_dim,)
        return {
            "obs": torch.zeros(n, k, *obs.shape[1:], device=device),
            "actions": torch.zeros(n, k, *action_shape, dtype=torch.long if self.discrete else None, device=device),
            "returns": torch.zeros(n, k, device=device),
            "timesteps": torch.zeros(n, k, dtype=torch.long, device=device),
            "length": torch.zeros(n, dtype=torch.long, device=device),
            "t": torch.zeros(n, dtype=torch.long, device=device),
            "wanted": torch.full((n,), self.target_return * self.reward_scale, device=device),
        }

    def act(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Each env's action at its new observation `obs` [N, ...], in replay units (Box: [-1, 1]; Discrete: the
        index, the argmax or, not deterministic, a draw from the softmax), kept in its context."""
        n = obs.shape[0]
        if self._context is None or self._context["length"].shape[0] != n:
            self._context = self._new_context(n, obs)
        ctx, k = self._context, self.context
        full = ctx["length"] == k
        if bool(full.any()):  # drop the oldest step of the envs whose context is full
            for name in ("obs", "actions", "returns", "timesteps"):
                ctx[name][full] = ctx[name][full].roll(-1, 1)
        rows = torch.arange(n, device=obs.device)
        at = ctx["length"].clamp(max=k - 1)
        ctx["obs"][rows, at] = obs.to(ctx["obs"].dtype)
        ctx["returns"][rows, at] = ctx["wanted"]
        ctx["timesteps"][rows, at] = ctx["t"]
        ctx["actions"][rows, at] = 0
        out = self(ctx["obs"], ctx["actions"], ctx["returns"], ctx["timesteps"])[rows, at]
        if not self.discrete:
            action = out
        elif deterministic:
            action = out.argmax(-1)
        else:
            action = torch.multinomial(out.softmax(-1), 1, generator=generator).squeeze(1)
        ctx["actions"][rows, at] = action
        ctx["length"] = (ctx["length"] + 1).clamp(max=k)
        ctx["t"] += 1
        return action

    def env_action(self, obs: Tensor, deterministic: bool = True, generator: torch.Generator | None = None) -> Tensor:
        action = self.act(obs, deterministic, generator)
        return action if self.discrete else scale_to_bounds(action, self.low, self.high)


def _gpt_init(module: nn.Module) -> None:
    """GPT-2's initialization (the authors' and CORL's): weights N(0, 0.02), biases 0, LayerNorm 1 and 0."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

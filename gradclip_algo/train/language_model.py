"""A small decoder-only, pre-norm (GPT-2 style) transformer over bytes (torch only).

``x = embed(bytes) + position``; per layer ``x = x + attn(LN(x))``, ``x = x + mlp(LN(x))`` (causal
multi-head self-attention, a GELU MLP of width ``mlp_ratio * d_model``); then ``LN`` and a linear head to
256 logits. No dropout, no weight tying, no qk-layernorm, biases everywhere. GPT-2's initialisation: every
weight of a linear layer and of the embeddings is normal with std 0.02, the two projections that write into
the residual stream (``attn.out``, ``mlp.down``) with std ``0.02 / sqrt(2 * n_layers)``; biases 0,
LayerNorms 1 and 0. Parameter names: ``embed``, ``position``, ``layers.<i>.attn_norm``,
``layers.<i>.attn.qkv``, ``layers.<i>.attn.out``, ``layers.<i>.mlp_norm``, ``layers.<i>.mlp.up``,
``layers.<i>.mlp.down``, ``norm``, ``head``.

The attention logits ``z_ij = q_i · k_j / sqrt(d_head)`` are computed explicitly, so every forward pass also
keeps their largest value over the batch, heads and causal pairs ``j <= i`` (a 0-d tensor on the model's
device, no host sync): :meth:`ByteTransformer.max_attention_logit`. Their growth at high learning rates is
the attention-logit instability of Wortsman et al. (2023, arXiv 2309.14322).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradclip_algo.train.text_data import VOCAB_SIZE

INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.max_logit = torch.full((), -math.inf)
        """The largest attention logit of the last forward pass (detached)."""

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        head = width // self.n_heads
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, head).permute(2, 0, 3, 1, 4).unbind(0)
        logits = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head))
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        logits = logits.masked_fill(future, -math.inf)
        self.max_logit = logits.detach().amax()
        attended = torch.softmax(logits, dim=-1) @ v
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, d_model: int, mlp_ratio: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, mlp_ratio * d_model)
        self.down = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Layer(nn.Module):
    """One pre-norm transformer layer."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ByteTransformer(nn.Module):
    """``(batch, T)`` int64 bytes -> ``(batch, T, 256)`` next-byte logits, ``T <= context_length``."""

    def __init__(
        self, context_length: int, d_model: int, n_layers: int, n_heads: int, mlp_ratio: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, d_model)
        self.position = nn.Embedding(context_length, d_model)
        self.layers = nn.ModuleList(Layer(d_model, n_heads, mlp_ratio) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB_SIZE)
        residual_std = INIT_STD / math.sqrt(2 * n_layers)
        with torch.no_grad():
            for name, module in self.named_modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    std = residual_std if name.endswith(("attn.out", "mlp.down")) else INIT_STD
                    nn.init.normal_(module.weight, std=std)
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))

    def max_attention_logit(self) -> Tensor:
        """The largest attention logit of the last forward pass over every layer (0-d, detached)."""
        return torch.stack([layer.attn.max_logit.to(self.head.weight.device) for layer in self.layers]).amax()

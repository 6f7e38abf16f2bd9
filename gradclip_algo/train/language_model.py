"""A small decoder-only, pre-norm transformer over bytes (torch only).

``x = embed(bytes) + position``; per layer ``x = x + attn(LN(x))``, ``x = x + mlp(LN(x))`` (causal
multi-head self-attention, a GELU MLP of width ``mlp_ratio * d_model``); then ``LN`` and a linear head to
256 logits. No dropout, no weight tying, biases everywhere, torch's default initialisation except the
embeddings (normal, std 0.02). Parameter names: ``embed``, ``position``, ``layers.<i>.attn_norm``,
``layers.<i>.attn.qkv``, ``layers.<i>.attn.out``, ``layers.<i>.mlp_norm``, ``layers.<i>.mlp.up``,
``layers.<i>.mlp.down``, ``norm``, ``head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradclip_algo.train.text_data import VOCAB_SIZE


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, width // self.n_heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
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
        with torch.no_grad():
            nn.init.normal_(self.embed.weight, std=0.02)
            nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))

"""A tiny decoder-only transformer (GPT style) over bytes, for the ``chars`` data set.

token embedding → ``n_layers`` pre-norm blocks → final RMSNorm → lm_head (untied). Each block:
RMSNorm → fused qkv Linear → (B, T, 3, H, D) → rotary positions (rotate-half) on q and k →
causal ``scaled_dot_product_attention`` → output projection, residual add; RMSNorm → MLP
(Linear-GELU-Linear), residual add. The forward returns logits (B, T, vocab).

Defaults: vocab 128 (7-bit characters), d_model 64, 4 heads of 16, 2 layers, context 64; about
0.1M parameters. The coupling analysis finds one group per head (a run of ``head_dim`` rows of
each of q, k, v in ``qkv.weight``, tied across the rotary halves), one per MLP hidden layer, and
the residual stream as one group shared by every block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(context: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (context, head_dim): the frequencies repeated for the two halves."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(context, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, context: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        cos, sin = rotary_tables(context, self.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, D)
        cos, sin = self.cos[:T], self.sin[:T]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, context: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads, context)
        self.norm2 = RMSNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio * d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab_size: int = 128, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                 context: int = 64, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, context, mlp_ratio) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def build_model(vocab_size: int = 128, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                context: int = 64) -> TinyGPT:
    return TinyGPT(vocab_size, d_model, n_heads, n_layers, context)


def example_inputs() -> tuple[torch.Tensor]:
    """One batch of two sequences of 64 byte ids."""
    return (torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0)),)

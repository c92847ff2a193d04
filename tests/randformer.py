"""A hypothesis strategy for random TRANSFORMER architectures, for the invariant tests.

``specs()`` draws a ``FormerSpec``: an input stem, 1-3 blocks and a head, with these choices:

* input: float tokens (2 x 8 x 5) through an input Linear to ``d_model``, or token ids (2 x 8)
  through an ``nn.Embedding``;
* positions: rotary (rotate-half ``cat([-x2, x1], -1)``, cos/sin from a non-persistent
  ``inv_freq`` buffer, applied to q and k) or a learned positional embedding (an
  ``nn.Parameter`` of shape (1, T, d_model));
* norm: ``nn.LayerNorm`` or RMSNorm (``x * rsqrt(mean(x^2) + eps) * weight``); pre-norm (with a
  final norm before the head) or post-norm;
* attention heads: ``d_model = heads * head_dim``, heads in {1, 2, 4}, head_dim in {2, 4};
  multi-head, grouped-query (1 < kv_heads < heads) or multi-query (kv_heads = 1), the k/v heads
  repeated with ``repeat_interleave``, ``expand`` + ``reshape``, or SDPA's ``enable_gqa=True``;
* projections: separate q/k/v Linears, or one fused qkv Linear split with
  ``reshape(B, T, 3, H, D)`` + ``permute`` + ``unbind(0)``, with ``chunk(3, -1)`` (both when
  kv_heads = heads), or with ``split`` (grouped-query / multi-query);
* head views: ``view(B, T, H, D)`` with the head count written out, or ``view(B, T, -1, D)``;
* attention: ``F.scaled_dot_product_attention`` or explicit ``softmax(q @ k^T * scale) @ v``,
  causal or not;
* per block: an optional token-mixing MLP (MLP-Mixer style: Linear over the sequence dim after a
  transpose), then attention, then a channel MLP (plain, or gated SwiGLU-style);
* head: mean over tokens, then Linear to ``CLASSES``.

Sizes stay tiny so one model runs in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

BATCH, TOKENS, D_IN, VOCAB, CLASSES = 2, 8, 5, 11, 3
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass(frozen=True)
class BlockSpec:
    token_mixer: int  # hidden width of the token-mixing MLP over the sequence dim; 0: none
    mlp_hidden: int
    act: str
    gated: bool  # SwiGLU-style act(w1 x) * w3 x

    def __repr__(self) -> str:
        return (f"BlockSpec(token_mixer={self.token_mixer!r}, mlp_hidden={self.mlp_hidden!r}, "
                f"act={self.act!r}, gated={self.gated!r})")


@dataclass(frozen=True)
class FormerSpec:
    inputs: str  # "float" | "ids"
    positions: str  # "rotary" | "learned"
    norm: str  # "layer" | "rms"
    prenorm: bool
    heads: int
    head_dim: int
    kv_heads: int
    kv_repeat: str  # "repeat_interleave" | "expand" | "sdpa_gqa" (only used when kv_heads < heads)
    qkv: str  # "separate" | "fused_reshape" | "fused_chunk" | "fused_split"
    infer_heads: bool  # view(B, T, -1, D) instead of view(B, T, H, D)
    attention: str  # "sdpa" | "explicit"
    causal: bool
    blocks: tuple[BlockSpec, ...]

    @property
    def d_model(self) -> int:
        return self.heads * self.head_dim

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__dataclass_fields__)
        return f"FormerSpec({fields})"


def example_inputs(spec: FormerSpec) -> tuple[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    if spec.inputs == "ids":
        return (torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator),)
    return (torch.randn(BATCH, TOKENS, D_IN, generator=generator),)


# -- the model ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(spec: FormerSpec) -> nn.Module:
    return nn.LayerNorm(spec.d_model) if spec.norm == "layer" else RMSNorm(spec.d_model)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(q.shape[-2], device=q.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):
    def __init__(self, spec: FormerSpec) -> None:
        super().__init__()
        self.spec = spec
        h, kv, d = spec.heads, spec.kv_heads, spec.head_dim
        if spec.qkv == "separate":
            self.q = nn.Linear(spec.d_model, h * d)
            self.k = nn.Linear(spec.d_model, kv * d)
            self.v = nn.Linear(spec.d_model, kv * d)
        else:
            self.qkv = nn.Linear(spec.d_model, (h + 2 * kv) * d)
        self.rotary = Rotary(d) if spec.positions == "rotary" else None
        self.out = nn.Linear(h * d, spec.d_model)

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, -1 if self.spec.infer_heads else count, self.spec.head_dim).transpose(1, 2)

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        rep = spec.heads // spec.kv_heads
        if rep == 1 or spec.kv_repeat == "sdpa_gqa":
            return x
        if spec.kv_repeat == "repeat_interleave":
            return x.repeat_interleave(rep, dim=1)
        b, kv, t, d = x.shape
        return x[:, :, None, :, :].expand(b, kv, rep, t, d).reshape(b, kv * rep, t, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        b, t, _ = x.shape
        h, kv, d = spec.heads, spec.kv_heads, spec.head_dim
        if spec.qkv == "separate":
            q, k, v = self._heads(self.q(x), h), self._heads(self.k(x), kv), self._heads(self.v(x), kv)
        elif spec.qkv == "fused_reshape":
            q, k, v = self.qkv(x).reshape(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        elif spec.qkv == "fused_chunk":
            q, k, v = (self._heads(y, h) for y in self.qkv(x).chunk(3, -1))
        else:
            q, k, v = self.qkv(x).split([h * d, kv * d, kv * d], dim=-1)
            q, k, v = self._heads(q, h), self._heads(k, kv), self._heads(v, kv)
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        k, v = self._repeat(k), self._repeat(v)
        if spec.attention == "sdpa":
            gqa = {"enable_gqa": True} if spec.kv_repeat == "sdpa_gqa" and kv < h else {}
            y = F.scaled_dot_product_attention(q, k, v, is_causal=spec.causal, **gqa)
        else:
            scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(d))
            if spec.causal:
                mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, h * d))


class TokenMixer(nn.Module):
    """MLP-Mixer token mixing: a Linear over the sequence dim, between two transposes."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(TOKENS, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, TOKENS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x.transpose(1, 2)))).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, d_model: int, block: BlockSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, block.mlp_hidden)
        self.gate = nn.Linear(d_model, block.mlp_hidden, bias=False) if block.gated else None
        self.act = ACTIVATIONS[block.act]()
        self.fc2 = nn.Linear(block.mlp_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.fc1(x))
        if self.gate is not None:
            hidden = hidden * self.gate(x)
        return self.fc2(hidden)


class Block(nn.Module):
    def __init__(self, spec: FormerSpec, block: BlockSpec) -> None:
        super().__init__()
        self.prenorm = spec.prenorm
        self.mix_norm = make_norm(spec) if block.token_mixer else None
        self.mixer = TokenMixer(block.token_mixer) if block.token_mixer else None
        self.attn_norm = make_norm(spec)
        self.attn = Attention(spec)
        self.mlp_norm = make_norm(spec)
        self.mlp = MLP(spec.d_model, block)

    def _residual(self, x: torch.Tensor, norm: nn.Module, sublayer: nn.Module) -> torch.Tensor:
        return x + sublayer(norm(x)) if self.prenorm else norm(x + sublayer(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixer is not None:
            x = self._residual(x, self.mix_norm, self.mixer)
        x = self._residual(x, self.attn_norm, self.attn)
        return self._residual(x, self.mlp_norm, self.mlp)


class RandomTransformer(nn.Module):
    """The model of a ``FormerSpec``: stem, blocks, (final norm if pre-norm), mean, Linear."""

    def __init__(self, spec: FormerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.stem = nn.Embedding(VOCAB, spec.d_model) if spec.inputs == "ids" else nn.Linear(D_IN, spec.d_model)
        self.pos = nn.Parameter(torch.zeros(1, TOKENS, spec.d_model)) if spec.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(spec, block) for block in spec.blocks)
        self.final_norm = make_norm(spec) if spec.prenorm else None
        self.head = nn.Linear(spec.d_model, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.pos is not None:
            x = x + self.pos
        for block in self.blocks:
            x = block(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.head(x.mean(1))

    def __repr__(self) -> str:
        return f"RandomTransformer({self.spec!r})"


def build(spec: FormerSpec) -> RandomTransformer:
    return RandomTransformer(spec)


# -- the strategy ------------------------------------------------------------------------------


@st.composite
def block_specs(draw) -> BlockSpec:
    return BlockSpec(token_mixer=draw(st.sampled_from([0, 0, 3, 6])), mlp_hidden=draw(st.integers(2, 8)),
                     act=draw(st.sampled_from(sorted(ACTIVATIONS))), gated=draw(st.booleans()))


@st.composite
def specs(draw, max_blocks: int = 3) -> FormerSpec:
    """A random ``FormerSpec`` whose model runs on ``example_inputs(spec)``."""
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 4]))
    kv_options = sorted({heads, 1, *(k for k in range(2, heads) if heads % k == 0)})
    kv_heads = draw(st.sampled_from(kv_options))  # MHA, MQA or GQA
    attention = draw(st.sampled_from(["sdpa", "explicit"]))
    if kv_heads < heads:
        repeats = ["repeat_interleave", "expand"] + (["sdpa_gqa"] if attention == "sdpa" else [])
        kv_repeat = draw(st.sampled_from(repeats))
        qkv = draw(st.sampled_from(["separate", "fused_split"]))
    else:
        kv_repeat = "repeat_interleave"  # unused
        qkv = draw(st.sampled_from(["separate", "fused_reshape", "fused_chunk"]))
    return FormerSpec(
        inputs=draw(st.sampled_from(["float", "ids"])),
        positions=draw(st.sampled_from(["rotary", "learned"])),
        norm=draw(st.sampled_from(["layer", "rms"])),
        prenorm=draw(st.booleans()),
        heads=heads, head_dim=head_dim, kv_heads=kv_heads, kv_repeat=kv_repeat, qkv=qkv,
        infer_heads=draw(st.booleans()),
        attention=attention,
        causal=draw(st.booleans()),
        blocks=tuple(draw(st.lists(block_specs(), min_size=1, max_size=max_blocks))),
    )


def unsupported_patterns(spec: FormerSpec) -> list[tuple[str, str]]:
    """Patterns the coupling analysis pins on purpose, as (description, text of the pin reason).

    None today: ``repeat_interleave``, ``expand`` + ``reshape`` and SDPA ``enable_gqa`` all widen
    grouped-query attention along the heads axis.
    """
    return []


def architectures(max_blocks: int = 3) -> st.SearchStrategy[RandomTransformer]:
    """Random transformer architectures as ``nn.Module`` instances (built from ``specs()``)."""
    return specs(max_blocks).map(build)

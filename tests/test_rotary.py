"""Rotary position embeddings, in every spelling, widen exactly.

Rotary embeddings rotate pairs of head_dim positions inside each head. The pairs are written as
contiguous halves (rotate-half: ``cat((-x2, x1), -1)``), as interleaved pairs taken by strided
slices (timm's ``rot``: ``stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)``, GPT-J's
``rotate_every_two``), on the first ``rotary_dim`` positions only (partial rotary, the rest passed
through by slice + cat), with sin and cos concatenated in one table (timm's ``apply_rot_embed_cat``),
or with frequencies per head (timm's ``RotaryEmbeddingMixed``: a learned table with a heads axis,
whose rows must follow their heads). In the big student heads are added and head_dim is unchanged,
so each of these is the teacher's own op on each teacher's heads: nothing may be pinned inside.

For each spelling, with two teachers that differ in every tensor, the tests check against values
computed here from the teachers themselves:

- I1: the big student computes the mean of the teachers' outputs (float64, 1e-6 relative);
- no group is pinned inside;
- I2: ``compress(big, "teacher:k")`` gives back teacher k's tensors bitwise, except the layer that
  writes the logits: teacher k's weight / 2 and the teachers' mean bias.

A strided slice that the big student cannot run as the teacher does (over a channel dim of its own,
across heads, through a channel shuffle) must still pin, naming the op.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from graphmerge.passes.certify import in_dtype
from graphmerge.passes.ir import widen_info
from torch import nn
from torch.utils import _pytree as pytree

import graphmerge
from tests.models import perturbed as _perturbed

TOKENS = 6
FEATURES = 5
N = 2


# -- the spellings -------------------------------------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face Llama / GPT-NeoX: the two halves of head_dim, swapped."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rot_interleaved(x: torch.Tensor) -> torch.Tensor:
    """timm ``pos_embed_sincos.rot``: neighbouring positions (0, 1), (2, 3), ... swapped."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face GPT-J: the same pairs, written with stack + flatten."""
    x1 = x[:, :, :, ::2]
    x2 = x[:, :, :, 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _angles(dim: int, interleaved: bool) -> torch.Tensor:
    """(TOKENS, dim) rotation angles: frequencies repeated per pair (interleaved) or per half."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(TOKENS, dtype=torch.float32), inv_freq)
    return freqs.repeat_interleave(2, -1) if interleaved else torch.cat([freqs, freqs], -1)


class RotaryNet(nn.Module):
    """Embedding, one attention block with rotary q and k, residual + LayerNorm, a classifier.

    ``spelling`` picks how the rotation is written (see the module docstring); ``rotary_dim`` below
    ``head_dim`` rotates only the first positions of each head; ``attention`` is SDPA or written out.
    """

    def __init__(self, spelling: str, *, heads: int = 4, head_dim: int = 8, rotary_dim: int | None = None,
                 attention: str = "sdpa", classes: int = 3):
        super().__init__()
        self.spelling, self.heads, self.head_dim, self.attention = spelling, heads, head_dim, attention
        self.rotary_dim = rotary_dim or head_dim
        dim = heads * head_dim
        self.embed = nn.Linear(FEATURES, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        angles = _angles(self.rotary_dim, interleaved=spelling != "rotate_half")
        if spelling == "mixed":  # learned frequencies per head (timm RotaryEmbeddingMixed)
            self.freqs = nn.Parameter(torch.rand(heads, self.rotary_dim // 2))
            self.register_buffer("positions", torch.arange(TOKENS, dtype=torch.float32), persistent=False)
        elif spelling == "mixed_table":  # a fixed table per head: heads x tokens x head_dim
            per_head = torch.rand(heads, 1, self.rotary_dim // 2) * torch.arange(TOKENS)[:, None]
            self.register_buffer("sin", per_head.repeat_interleave(2, -1).sin(), persistent=False)
            self.register_buffer("cos", per_head.repeat_interleave(2, -1).cos(), persistent=False)
        elif spelling == "cat":  # timm RotaryEmbeddingCat: sin and cos in one table
            self.register_buffer("emb", torch.cat([angles.sin(), angles.cos()], -1), persistent=False)
        elif spelling == "gptj":  # one angle per pair, repeated where it is applied
            self.register_buffer("sin", angles[:, ::2].sin(), persistent=False)
            self.register_buffer("cos", angles[:, ::2].cos(), persistent=False)
        else:
            self.register_buffer("sin", angles.sin(), persistent=False)
            self.register_buffer("cos", angles.cos(), persistent=False)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """sin and cos, broadcasting against (batch, heads, tokens, rotary_dim)."""
        if self.spelling == "cat":
            sin, cos = self.emb.chunk(2, -1)
            return sin, cos
        if self.spelling == "mixed":
            angles = (self.positions[None, :, None] * self.freqs[:, None, :]).repeat_interleave(2, -1)
            return angles.sin(), angles.cos()
        return self.sin, self.cos

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, heads, tokens, head_dim); the first rotary_dim positions of each head rotate."""
        sin, cos = self._tables()
        rotate = rotate_half if self.spelling == "rotate_half" else rot_interleaved
        x_rot, x_pass = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        x_rot = x_rot * cos + rotate(x_rot) * sin
        return torch.cat((x_rot, x_pass), dim=-1) if self.rotary_dim < self.head_dim else x_rot

    def _rope_gptj(self, x: torch.Tensor) -> torch.Tensor:
        """GPT-J: rotary on (batch, tokens, heads, head_dim), before the heads move in front."""
        sin = torch.repeat_interleave(self.sin[:, None, :], 2, 2)
        cos = torch.repeat_interleave(self.cos[:, None, :], 2, 2)
        x_rot, x_pass = x[:, :, :, :self.rotary_dim], x[:, :, :, self.rotary_dim:]
        x_rot = x_rot * cos + rotate_every_two(x_rot) * sin
        return torch.cat([x_rot, x_pass], dim=-1) if self.rotary_dim < self.head_dim else x_rot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.embed(x)
        q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, self.head_dim).unbind(2)  # (b, t, heads, head_dim)
        if self.spelling == "gptj":
            q, k = self._rope_gptj(q), self._rope_gptj(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.spelling != "gptj":
            q, k = self._rope(q), self._rope(k)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1) @ v
        h = self.norm(h + self.proj(y.transpose(1, 2).reshape(b, t, -1)))
        return self.head(h.mean(1))


# -- the checks ----------------------------------------------------------------------------------

def _teachers(model: nn.Module) -> list[nn.Module]:
    return [_perturbed(copy.deepcopy(model), seed) for seed in range(1, N + 1)]


def _leaves(output) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _check(teachers: list[nn.Module], inputs: tuple, head: str, kwargs: dict | None = None) -> float:
    """I1 in float64, nothing pinned inside, and I2 for every teacher; returns the I1 error.

    ``head`` is the module that writes the logits: the one layer whose tensors are not a teacher's.
    """
    kwargs = kwargs or {}
    big = graphmerge.widen(teachers, inputs, example_kwargs=kwargs)
    info = widen_info(big)[1]
    assert not info.groups.internal_pinned, [g.reason for g in info.groups.internal_pinned][:3]
    teachers64 = [copy.deepcopy(t).double() for t in teachers]
    big64 = in_dtype(big, torch.float64).eval()
    inputs64 = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        expected = [torch.stack(v).mean(0) for v in zip(*[_leaves(t(*inputs64, **kwargs, **info.class_kwargs))
                                                            for t in teachers64], strict=True)]
        got = _leaves(big64(*inputs64, **kwargs))
    assert len(got) == len(expected)
    error = 0.0
    for a, b in zip(got, expected, strict=True):
        scale = max(1.0, float(b.abs().max()))
        error = max(error, float((a - b).abs().max()) / scale)
    assert error <= 1e-6, f"I1: {error:.3g} (relative)"
    for k in range(N):
        _check_recovery(graphmerge.compress(big, f"teacher:{k}"), teachers, k, head)
    return error


def _check_recovery(student: nn.Module, teachers: list[nn.Module], k: int, head: str) -> None:
    """I2: teacher k's tensors bitwise; the logits layer holds its weight / N and the mean bias."""
    own = teachers[k].state_dict()
    state = student.state_dict()
    assert set(state) == set(own)
    for key, value in state.items():
        if key == f"{head}.weight":
            expected = own[key] / N
        elif key == f"{head}.bias":
            expected = torch.stack([t.state_dict()[key].double() for t in teachers]).mean(0).to(value.dtype)
        else:
            expected = own[key]
        assert torch.equal(value, expected), f"I2 teacher:{k}: {key}"


X = torch.randn(3, TOKENS, FEATURES, generator=torch.Generator().manual_seed(0))

SPELLINGS = [
    pytest.param("rotate_half", None, id="rotate_half"),
    pytest.param("interleaved", None, id="interleaved_timm_rot"),
    pytest.param("gptj", None, id="interleaved_gptj_rotate_every_two"),
    pytest.param("cat", None, id="timm_apply_rot_embed_cat"),
    pytest.param("rotate_half", 4, id="partial_rotate_half"),
    pytest.param("interleaved", 4, id="partial_interleaved"),
    pytest.param("gptj", 4, id="partial_gptj"),
    pytest.param("mixed", None, id="mixed_learned_frequencies_per_head"),
    pytest.param("mixed_table", None, id="mixed_fixed_table_per_head"),
]


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize(("spelling", "rotary_dim"), SPELLINGS)
def test_rotary_spelling_widens_exactly_and_compresses_back(spelling: str, rotary_dim: int | None,
                                                            attention: str) -> None:
    torch.manual_seed(0)
    model = RotaryNet(spelling, rotary_dim=rotary_dim, attention=attention).eval()
    _check(_teachers(model), (X,), head="head")


def test_per_head_frequencies_follow_their_heads() -> None:
    """The learned table's heads axis is laid out like the heads: teacher t's rows in its block."""
    torch.manual_seed(0)
    teachers = _teachers(RotaryNet("mixed").eval())
    big = graphmerge.widen(teachers, (X,))
    assert torch.equal(big.state_dict()["freqs"], torch.cat([t.freqs for t in teachers]))
    assert big.state_dict()["qkv.weight"].shape == (N * 3 * 32, N * 32)


# -- what still pins ------------------------------------------------------------------------------

class StridedChannels(nn.Module):
    """Every other channel of a layer's output, read by the next layer: a channel dim of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 8)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))[..., ::2]).mean(1)


class StridedHeads(nn.Module):
    """The attention's even heads, then its odd ones: the step runs across the heads axis, which the
    big student widens (teacher-major: a step would take heads from the wrong teachers' blocks)."""

    def __init__(self, heads: int = 4, head_dim: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(FEATURES, 3 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        y = torch.cat([y[:, ::2], y[:, 1::2]], 1)
        return self.out(y.transpose(1, 2).reshape(b, t, -1)).mean(1)


class StridedShuffle(nn.Module):
    """A channel dim viewed as (2, 4), its even and odd columns put side by side: a channel shuffle.
    No head makes the positions of a row one channel, so the block has no per-axis layout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = torch.relu(self.fc1(x)).view(b, t, 2, 4)
        h = torch.cat([h[..., ::2], h[..., 1::2]], -1)
        return self.fc2(h.reshape(b, t, 8)).mean(1)


@pytest.mark.parametrize(("model", "why"), [
    (StridedChannels, "strided slice of a channel dim"),
    (StridedHeads, "the sliced axis carries widened channels"),
    (StridedShuffle, "no per-axis layout"),
])
def test_a_strided_slice_the_big_student_cannot_run_still_pins(model: type[nn.Module], why: str) -> None:
    torch.manual_seed(0)
    teacher = model().eval()
    groups = graphmerge.analyze(teacher, (X,))
    reasons = [g.reason for g in groups.internal_pinned]
    assert reasons and all("aten.slice.Tensor" in r and why in r for r in reasons), reasons
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphmerge.widen(_teachers(teacher), (X,))
    assert any(why in str(w.message) for w in caught), [str(w.message) for w in caught]


# -- models from timm and Hugging Face -----------------------------------------------------------

TIMM_ROTARY = [
    ("vit_small_patch16_rope_224", {}),  # timm RotaryEmbeddingCat, interleaved rot
    ("vit_small_patch16_rope_mixed_224", {}),  # RotaryEmbeddingMixed: learned frequencies per head
    ("eva02_tiny_patch14_224", {"num_classes": 10}),  # EVA02, interleaved; a zero key bias in its qkv bias
]


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize(("name", "kwargs"), TIMM_ROTARY, ids=[name for name, _ in TIMM_ROTARY])
def test_timm_rotary_vit_widens_exactly_and_compresses_back(name: str, kwargs: dict) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, img_size=64, depth=2, **kwargs).eval()
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _check(_teachers(model), (image,), head="head")


HF_ROTARY = [
    ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)),
    ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=64,
                                                 rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                                                  "rope_type": "default"})),
]


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize(("config", "arch", "kwargs"), HF_ROTARY, ids=[arch for _, arch, _ in HF_ROTARY])
def test_hugging_face_rotary_widens_exactly_and_compresses_back(config: str, arch: str, kwargs: dict) -> None:
    """GPT-J: interleaved pairs on a partial rotary_dim; GPT-NeoX: rotate-half on a partial rotary_pct."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = getattr(transformers, arch)(getattr(transformers, config)(
        vocab_size=100, bos_token_id=1, eos_token_id=2, **kwargs)).eval()
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    _check(_teachers(model), (ids,), head="lm_head",
           kwargs={"attention_mask": torch.ones(2, 8, dtype=torch.long)})

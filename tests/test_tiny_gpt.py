"""The bundled tiny decoder-only transformer (examples:tiny_gpt) and the ``chars`` data set."""

from __future__ import annotations

import math

import torch
from graphmerge.passes.ir import widen_info

import graphmerge
from graphmerge import recipe
from graphmerge.data import chars, load_data
from graphmerge.examples.tiny_gpt import TinyGPT, build_model, example_inputs
from graphmerge.training import cross_entropy, evaluate


def _small(seed: int) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab_size=128, d_model=32, n_heads=2, n_layers=1, context=16)


def test_forward_shape_and_sequence_loss() -> None:
    logits = build_model()(*example_inputs())
    assert logits.shape == (2, 64, 128)
    target = torch.randint(0, 128, (2, 64))
    flat = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), target.reshape(-1))
    assert torch.allclose(cross_entropy(logits, target), flat)


def test_analysis_pins_nothing_inside_and_heads_are_groups() -> None:
    model = build_model().eval()
    groups = graphmerge.analyze(model, example_inputs())
    assert groups.internal_pinned == []
    n_heads, head_dim = 4, 16
    for layer in range(2):
        key = (f"blocks.{layer}.attn.qkv.weight", 0)
        heads = [g for g in groups.groups if key in g.index_maps]
        assert len(heads) == 1
        index_map = heads[0].index_maps[key]
        # one unit per head, owning head_dim rows of each of q, k and v
        assert tuple(index_map.shape) == (n_heads, 3 * head_dim)
        assert sorted(index_map.flatten().tolist()) == list(range(3 * n_heads * head_dim))
        assert tuple(heads[0].index_maps[(f"blocks.{layer}.attn.proj.weight", 1)].shape) == (n_heads, head_dim)


def test_widen_certifies_i1() -> None:
    teachers = [_small(1).eval(), _small(2).eval()]
    inputs = (torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)),)
    big = graphmerge.widen(teachers, inputs)
    assert widen_info(big)[1].certificates["I1"].relative_error <= 1e-6


def test_chars_is_deterministic_and_shifted() -> None:
    first, second = chars(context=16, n_train=4000, n_val=800, n_test=800), load_data("chars")
    again = chars(context=16, n_train=4000, n_val=800, n_test=800)
    for a, b in zip(first[:3], again[:3], strict=True):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    x, y = first[0].tensors
    assert x.shape == y.shape == (249, 16) and x.dtype == torch.int64 and int(x.max()) <= 127
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert first[3] == "classification"
    assert [len(split) for split in second[:3]] == [3124, 312, 312]


def test_quick_merge_returns_a_tiny_gpt() -> None:
    train, val, _, _ = chars(context=16, n_train=6000, n_val=800, n_test=800)
    teachers = [recipe.train(_small(seed), train, epochs=1, batch_size=32, lr=0.1, seed=seed).model
                for seed in (1, 2)]
    result = recipe.merge(teachers, train, val_data=val, gate_epochs=2, finetune_epochs=1, batch_size=32,
                          weight_lr=0.1, finetune_lr=0.1, lambda0=4.0, gate_lr=0.5, seed=0)
    assert isinstance(result.student, TinyGPT)
    loss = evaluate(result.student, val, "cross_entropy")["loss"]
    assert math.isfinite(loss) and loss < math.log(128)

"""Transformers and modern CNNs from timm and Hugging Face: I1 in float64, I2 and I4.

Each model is built with random weights (timm ``pretrained=False``; Hugging Face from the tiny
configs of ``tests/hf_tiny.py``). The expected values are computed here from the teachers' own
outputs and tensors:

- I1: the big student's output leaves equal the mean of the teachers' leaves (float64, 1e-6);
- I2: keeping teacher k's channels gives back teacher k's tensors bitwise, except the layers
  that average the teachers into an output, which hold teacher k's weight / N and the teachers'
  mean bias (checked against those values computed here);
- I4: the student is an instance of the teachers' class and reloads with ``strict=True``.

By default a representative subset runs; ``GRAPHMERGE_FULL_ZOO=1`` runs every model listed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from graphmerge.passes.certify import in_dtype
from graphmerge.passes.ir import widen_info
from torch import nn
from torch.utils import _pytree as pytree

import graphmerge
from tests.models import perturbed as _perturbed
from tests.test_invariants import check_pipeline
from tests.zoo_models import full_zoo

torch.set_num_threads(1)

pytestmark = pytest.mark.zoo

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

HF_MODELS = ["BertForSequenceClassification", "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM",
             "ViTForImageClassification", "FalconForCausalLM"]
TIMM_MODELS = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "convnext_atto", "ghostnet_100",
               "poolformer_s12", "swin_tiny_patch4_window7_224", "coatnet_nano_rw_224", "mobilevit_xxs",
               "mixer_s16_224", "resmlp_12_224", "levit_128s", "efficientformer_l1", "edgenext_xx_small",
               "poolformerv2_s12", "convformer_s18", "caformer_s18", "hgnetv2_b0"]
TIMM_REPRESENTATIVE = ["vit_tiny_patch16_224", "convnext_atto", "ghostnet_100", "edgenext_xx_small", "hgnetv2_b0"]
HF_REPRESENTATIVE = ["BertForSequenceClassification", "GPT2LMHeadModel", "LlamaForCausalLM", "FalconForCausalLM"]


def _timm(name: str) -> tuple[list[nn.Module], tuple, dict]:
    teachers = [_perturbed(timm.create_model(name, pretrained=False), seed) for seed in (1, 2)]
    size = teachers[0].pretrained_cfg["input_size"]
    return teachers, (torch.randn(2, *size, generator=torch.Generator().manual_seed(0)),), {}


def _hf(name: str) -> tuple[list[nn.Module], tuple, dict]:
    from tests.hf_tiny import tiny_model

    teachers = [_perturbed(tiny_model(name, 0), seed) for seed in (1, 2)]
    generator = torch.Generator().manual_seed(0)
    if "Image" in name:
        return teachers, (torch.randn(2, 3, 32, 32, generator=generator),), {}
    ids = torch.randint(3, 100, (2, 8), generator=generator)
    return teachers, (ids,), {"attention_mask": torch.ones(2, 8, dtype=torch.long)}


def _leaves(output) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _check(teachers: list[nn.Module], inputs: tuple, kwargs: dict) -> None:
    n = len(teachers)
    big = graphmerge.widen(teachers, inputs, example_kwargs=kwargs)
    info = widen_info(big)[1]
    assert not info.groups.internal_pinned, [g.reason for g in info.groups.internal_pinned][:3]
    class_kwargs = info.class_kwargs
    # I1 in float64, against the teachers' own outputs
    teachers64 = [copy.deepcopy(t).double() for t in teachers]
    # in_dtype also retargets dtype literals the capture recorded (EdgeNeXt's pos.to(weight.dtype))
    big64 = in_dtype(big, torch.float64).eval()
    inputs64 = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        expected = [torch.stack(v).mean(0) for v in zip(*[_leaves(t(*inputs64, **kwargs, **class_kwargs))
                                                            for t in teachers64], strict=True)]
        got = _leaves(big64(*inputs64, **kwargs))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        scale = max(1.0, float(b.abs().max()))
        assert float((a - b).abs().max()) <= 1e-6 * scale, f"I1: {float((a - b).abs().max()):.3g} (scale {scale:.3g})"
    check_pipeline(teachers, big, inputs, kwargs)
    # I2: teacher k's tensors, or (the averaging layers) weight / N and the mean bias
    for k in range(n):
        student = graphmerge.compress(big, f"teacher:{k}")
        own = teachers[k].state_dict()
        exact = 0
        for key, value in student.state_dict().items():
            if torch.equal(value, own[key]):
                exact += 1
                continue
            mean = torch.stack([t.state_dict()[key].double() for t in teachers]).mean(0).to(value.dtype)
            assert torch.equal(value, own[key] / n) or torch.equal(value, mean), f"I2 teacher:{k}: {key}"
        assert exact >= len(own) - 4, f"I2 teacher:{k}: only {exact} of {len(own)} tensors are the teacher's"
        # I4: the teachers' own class, reloaded strictly
        assert type(student) is type(teachers[0])
        fresh = copy.deepcopy(teachers[0])
        fresh.load_state_dict(student.state_dict(), strict=True)
        with torch.no_grad():
            for a, b in zip(_leaves(fresh(*inputs, **kwargs, **class_kwargs)),
                            _leaves(student(*inputs, **kwargs, **class_kwargs)), strict=True):
                assert torch.equal(a, b), "I4: the reloaded student differs"


@pytest.mark.parametrize("name", HF_MODELS if full_zoo() else HF_REPRESENTATIVE)
def test_hugging_face_model_merges_exactly(name: str) -> None:
    _check(*_hf(name))


@pytest.mark.parametrize("name", TIMM_MODELS if full_zoo() else TIMM_REPRESENTATIVE)
def test_timm_model_merges_exactly(name: str) -> None:
    _check(*_timm(name))

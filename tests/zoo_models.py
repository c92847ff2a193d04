"""The torchvision classification zoo as the tests and benchmarks see it: names, inputs, subsets.

Models are always built with ``weights=None`` (never a download). Inputs are 1x3x64x64 where the
model allows; ViT and MaxViT need their fixed 224x224, Inception v3 at least 75x75.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torchvision
from torch import nn

ALL_MODELS: list[str] = sorted(torchvision.models.list_models(module=torchvision.models))

INPUT_SIZE = {name: 224 for name in ALL_MODELS if name.startswith(("vit_", "maxvit"))}
INPUT_SIZE["inception_v3"] = 96

# I1-I4 by default on these (all of ALL_MODELS with GRAPHMERGE_FULL_ZOO=1). Transformers join them in
# tests/test_zoo.py (swin_t, swin_v2_t) and tests/test_zoo_transformers.py (timm ViT, Hugging Face);
# the ViT-B models are full-mode only: their float64 copies take ~20 GiB beside the second worker.
REPRESENTATIVE = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5",
    "squeezenet1_0", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny", "googlenet",
    "mnasnet0_5", "vgg11",
]

# Models whose analysis pins groups inside the network (so I1 cannot hold), with the reason
# observed (passes/registry.py has no rule for the op, or pins it on purpose). Swin and Swin v2
# left this list with the torch.export front end (heads as channels, windowed and cosine attention),
# MaxViT with the einsum rule (I1 1.3e-15 in float64; full mode only, 224 px, ~5 min on this machine).
EXPECTED_INTERNAL_PINNED: dict[str, str] = {}
# SqueezeNet (a ReLU and an average pool after the classifier conv) left this list with averaged
# outputs: the big student keeps each teacher's classifier block and averages at the output (I1);
# its student averages before the ReLU, so the I3 certificate is skipped with that reason.
AVERAGED_OUTPUT = {"squeezenet1_0", "squeezenet1_1"}


# Above this many parameters N=2 teachers, the big student and its copies (or an fp32 model, its
# ONNX file and two runtimes' copies) do not fit in this machine's 24 GiB beside the second test
# process; benchmarks/zoo.py's --max-compile-params defaults to the same.
PARAM_CAP = 300_000_000


def skip_above_param_cap(name: str, model: nn.Module) -> None:
    params = sum(p.numel() for p in model.parameters())
    if params > PARAM_CAP:
        pytest.skip(f"{name}: {params / 1e6:.0f} M parameters, above the {PARAM_CAP / 1e6:.0f} M memory cap")


def full_zoo() -> bool:
    return os.environ.get("GRAPHMERGE_FULL_ZOO") == "1"


def build(name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None).eval()


def example_inputs(name: str, batch: int = 2) -> tuple[torch.Tensor]:
    size = INPUT_SIZE.get(name, 64)
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, size, size, generator=generator),)

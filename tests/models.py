"""Hand-built models with hand-counted coupling groups, shared by the coupling and invariant tests.

Every model is a plain ``nn.Module`` built without arguments (the paper's MLP, LeNet and ResNet20
are the bundled ``graphmerge.examples``, built with explicit arguments). Its docstring (a comment for
the examples) derives, on paper, the coupling groups the analysis must find; ``CASES`` carries the
same count as data:

* ``widened``: the widths of the widened groups, sorted;
* ``pinned``: how many pinned groups (here always the image channels and the logits: 2);
* ``head``: the module that writes the pinned output group (its weight becomes W_t / N and its
  bias the teachers' mean bias in the big student: the I2 exception).

Counting rules (DESIGN.md): a group is reported only if it touches a parameter or buffer dim;
residual add/mul, BatchNorm, elementwise activations, depthwise convs (in = out) and a module
called twice merge channel spaces; ``cat`` keeps its inputs' groups apart; ``chunk``/``split``
cut a space into pieces that are separate groups; a flatten gives every channel a run of H*W
features. The graph input group and the logits group are pinned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from graphmerge.examples.lenet import LeNet
from graphmerge.examples.mlp import SineMLP
from graphmerge.examples.resnet20 import ResNet20
from graphmerge.pipeline import perturb

NUM_CLASSES = 5


def images(batch: int = 2, size: int = 8) -> tuple[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return (torch.randn(batch, 3, size, size, generator=generator),)


# -- the models --------------------------------------------------------------------------------


# The paper's three networks are the bundled examples (graphmerge/examples), built with explicit
# arguments so that the hand counts below stay true if an example's defaults change:
#
# * SineMLP 1 -> 100 -> 1. Groups: input feature (fc1.weight dim 1) pinned; hidden 100 (fc1 out +
#   bias, fc2 in) widened; output (fc2 out + bias) pinned. Widened [100], pinned 2: 3 groups.
# * LeNet-5 on 3x32x32: conv 6, pool, conv 16, pool, flatten 16x5x5 -> 120 -> 84 -> 10 classes.
#   Groups: image 3 pinned; conv1 out 6; conv2 out 16 (fc1 in-features in runs of 25: channel c
#   owns features 25c..25c+24); fc1 out 120; fc2 out 84; logits pinned. Widened [6, 16, 84, 120],
#   pinned 2.
# * CIFAR ResNet20, 3 stages x 3 basic blocks at 16/32/64, projection shortcuts (1x1 conv + BN).
#   Groups: image pinned; the residual stream of each stage is one group (stem or projection
#   output + every bn2 of the stage, joined by the adds): 16, 32, 64; every block's conv1/bn1
#   output is its own group: 3 x 16, 3 x 32, 3 x 64; logits pinned.
#   Widened [16, 16, 16, 16, 32, 32, 32, 32, 64, 64, 64, 64] (12), pinned 2.


def sine_mlp() -> SineMLP:
    return SineMLP(hidden=100)


def lenet() -> LeNet:
    return LeNet(num_classes=10, in_channels=3)


def resnet20() -> ResNet20:
    return ResNet20(num_classes=10, widths=(16, 32, 64), blocks_per_stage=3)


class DenseBlockNet(nn.Module):
    """A DenseNet-style block: stem 8, two BN-ReLU-conv dense layers (4 then 6 new channels)
    concatenated onto the stream, BN over the 18-channel concatenation, 1x1 transition to 10,
    avg-pool 2, flatten 10x4x4 into the classifier.

    Groups: image pinned; stem 8 (stem out, bn_a, conv_a in, bn_b[0:8], conv_b in[0:8],
    norm[0:8], transition in[0:8]); conv_a out 4 (bn_b[8:12], conv_b in[8:12], norm[8:12], ...);
    conv_b out 6 (norm[12:18], transition in[12:18]); transition 10 (fc in, runs of 16); logits
    pinned. Widened [4, 6, 8, 10], pinned 2. ``norm.weight`` rows: stem 0..7, conv_a 8..11,
    conv_b 12..17.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(12)
        self.conv_b = nn.Conv2d(12, 6, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(18)
        self.transition = nn.Conv2d(18, 10, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(10 * 4 * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.conv_a(F.relu(self.bn_a(x)))], 1)
        x = torch.cat([x, self.conv_b(F.relu(self.bn_b(x)))], 1)
        x = self.pool(self.transition(F.relu(self.norm(x))))
        return self.fc(torch.flatten(x, 1))


class PreNormBlock(nn.Module):
    """A pre-norm residual block (``embed -> x + down(relu(up(norm(x)))) -> norm -> head``): the
    smallest model whose residual stream a normalisation spans."""

    def __init__(self, d: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.down(torch.relu(self.up(self.norm1(h))))
        return self.head(self.norm2(h)).mean(1)


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = conv_bn(in_channels, hidden, 1)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = conv_bn(hidden, out_channels, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class MobileNetV2Style(nn.Module):
    """Stem 8; inverted residuals (8->8, x2, s1, residual), (8->12, x3, s2), (12->12, x3, s1,
    residual); 1x1 head conv 16; global pool; classifier.

    Groups: image pinned; stream 8 (stem + block0 project, by the add); block0 hidden 16
    (expand out = depthwise in = depthwise out); block1 hidden 24; stream 12 (block1 project +
    block2 project, by the add); block2 hidden 36; head conv 16; logits pinned.
    Widened [8, 12, 16, 16, 24, 36], pinned 2.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3)
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, 1, 2),
            InvertedResidual(8, 12, 2, 3),
            InvertedResidual(12, 12, 1, 3),
        )
        self.head = conv_bn(12, 16, 1)
        self.classifier = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.expand(F.relu(self.reduce(s))))
        return x * s


class SENet(nn.Module):
    """Stem conv 6, conv 8, squeeze-and-excitation (8 -> 2 -> 8, ``x * s``), pool, classifier.

    Groups: image pinned; stem 6; conv 8 (conv out, bn, se.reduce in, se.expand out + bias,
    classifier in: ``x * s`` couples the gate's channels with x's); SE bottleneck 2; logits
    pinned. Widened [2, 6, 8], pinned 2.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.se = SqueezeExcite(8, 2)
        self.classifier = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.conv(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LayerScaleNet(nn.Module):
    """Stem 8; residual branch conv 12 -> conv 8 scaled by a (8, 1, 1) parameter read through
    ``get_attr`` (``y * self.gamma``); pool; classifier.

    Groups: image pinned; stream 8 (stem, bn, conv_a in, conv_b out + bias, gamma dim 0,
    classifier in); branch 12 (conv_a out, bn_a); logits pinned. Widened [8, 12], pinned 2.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv_a = nn.Conv2d(8, 12, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(12)
        self.conv_b = nn.Conv2d(12, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((8, 1, 1), 0.1))
        self.classifier = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.conv_b(F.relu(self.bn_a(self.conv_a(x)))) * self.gamma
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _ChannelsLastBlockNet(nn.Module):
    """ConvNeXt-style: patchify stem 8; block = depthwise 7x7, permute to channels-last,
    [LayerNorm(8)], Linear 8 -> 32, GELU, Linear 32 -> 8, ``* gamma`` with gamma of shape (8,),
    permute back, residual add; mean over H, W; classifier.

    Groups: image pinned; stream 8 (stem, depthwise in = out, [norm], pw1 in, pw2 out + bias,
    gamma, classifier in); hidden 32 (pw1 out + bias, pw2 in); logits pinned.
    Widened [8, 32], pinned 2.
    """

    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dwconv = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8) if norm else nn.Identity()
        self.pw1 = nn.Linear(8, 32)
        self.pw2 = nn.Linear(32, 8)
        self.gamma = nn.Parameter(torch.full((8,), 0.1))
        self.classifier = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        return self.classifier(x.mean((2, 3)))


class ChannelsLastScaleNet(_ChannelsLastBlockNet):
    __doc__ = _ChannelsLastBlockNet.__doc__ + "\n    Without the LayerNorm.\n"

    def __init__(self) -> None:
        super().__init__(norm=False)


class ConvNeXtBlockNet(_ChannelsLastBlockNet):
    __doc__ = _ChannelsLastBlockNet.__doc__ + (
        "\n    With the LayerNorm across the widened stream group (I3 cannot be exact: dropping\n"
        "    channels changes the normalisation statistics of the kept ones).\n")

    def __init__(self) -> None:
        super().__init__(norm=True)


class SharedModuleNet(nn.Module):
    """Stem 8; one conv+BN module called twice; conv 12; pool; classifier.

    Groups: image pinned; 8 (stem out = shared in = shared out, by the second call reading the
    first call's output); conv 12; logits pinned. Widened [8, 12], pinned 2.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.classifier = nn.Linear(12, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.conv(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ChannelSplitNet(nn.Module):
    """Stem 8 + BN; ``torch.chunk(x, 2, 1)``; branch a conv 4 -> 4, branch b conv 4 -> 6; cat
    back (10); 1x1 mix conv 12; pool; classifier.

    Groups: image pinned; stem half 0..3 (4) and half 4..7 (4), cut by the chunk; branch a 4;
    branch b 6; mix 12; logits pinned. Widened [4, 4, 4, 6, 12], pinned 2.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch_a = nn.Conv2d(4, 4, 3, padding=1)
        self.branch_b = nn.Conv2d(4, 6, 1)
        self.mix = nn.Conv2d(10, 12, 1)
        self.classifier = nn.Linear(12, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.stem(x), 2, dim=1)
        x = torch.cat([F.relu(self.branch_a(a)), F.relu(self.branch_b(b))], 1)
        x = F.relu(self.mix(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class UnevenSplitNet(nn.Module):
    """Stem 8; ``x.split([3, 5], 1)``; branch a conv 3 -> 4, branch b conv 5 -> 6; cat (10);
    mix 12; pool; classifier.

    Groups: image pinned; stem 0..2 (3) and 3..7 (5); branch a 4; branch b 6; mix 12; logits
    pinned. Widened [3, 4, 5, 6, 12], pinned 2.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch_a = nn.Conv2d(3, 4, 3, padding=1)
        self.branch_b = nn.Conv2d(5, 6, 1)
        self.mix = nn.Conv2d(10, 12, 1)
        self.classifier = nn.Linear(12, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.stem(x)).split([3, 5], 1)
        x = torch.cat([self.branch_a(a), self.branch_b(b)], 1)
        x = F.relu(self.mix(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    return x.transpose(1, 2).contiguous().view(batch, channels, height, width)


class ChannelShuffleNet(nn.Module):
    """Stem 8 + BN + ReLU; ShuffleNet channel shuffle with 2 groups (view, transpose, view);
    1x1 conv 10; pool; classifier.

    A shuffle only permutes channels: nothing is merged or cut. Groups: image pinned; stem 8,
    whose channel c = 4g + k reaches position 2k + g, so ``conv.weight`` dim 1 row c is
    ``[2 * (c % 4) + c // 4]``; conv 10; logits pinned. Widened [8, 10], pinned 2.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 10, 1)
        self.classifier = nn.Linear(10, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channel_shuffle(self.stem(x), 2)
        x = F.relu(self.conv(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class GroupedConvNet(nn.Module):
    """Stem 8 + BN; grouped conv 8 -> 8 with groups=4 + BN; 1x1 conv 10; pool; classifier.

    A grouped conv with in == out ties input channel c to output channel c group-wise, and
    channels can only be chosen in whole conv groups of 8 / 4 = 2. Groups: image pinned; 8
    (stem, bn, gconv in = gconv out, bn, conv in) with unit 2; conv 10; logits pinned.
    Widened [8, 10], pinned 2.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.gconv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 10, 1)
        self.classifier = nn.Linear(10, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(self.gconv(self.stem(x))))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class NonlinearHeadNet(nn.Module):
    """SqueezeNet-style head: conv 8, then a 1x1 conv writing the class channels, ReLU, global
    average pool. The logits group passes a ReLU and a pool after the layer that writes it.

    Groups: image pinned; conv 8; logits 5 (classifier out + bias), averaged at the output: laid
    out per teacher and averaged after the ReLU and pool, since relu(mean_t z_t) != mean_t
    relu(z_t). Widened [5 (averaged), 8], pinned 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = nn.Conv2d(8, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.classifier(F.relu(self.conv(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# -- the hand counts as data -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCase:
    """A hand-built model, its example input and its hand-counted groups."""

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[torch.Tensor, ...]]
    widened: tuple[int, ...]
    pinned: int
    head: str
    units: dict[int, int] = field(default_factory=dict)  # group width -> selection unit
    across_norm: bool = False  # a LayerNorm spans a widened group: I3 cannot be exact

    def __repr__(self) -> str:
        return self.name


CASES: dict[str, ModelCase] = {case.name: case for case in [
    ModelCase("mlp", sine_mlp, lambda: (torch.linspace(-3, 3, 16).unsqueeze(1),), (100,), 2, "fc2"),
    ModelCase("lenet", lenet, lambda: images(2, 32), (6, 16, 84, 120), 2, "fc3"),
    ModelCase("resnet20", resnet20, lambda: images(2, 32),
              (16, 16, 16, 16, 32, 32, 32, 32, 64, 64, 64, 64), 2, "fc"),
    ModelCase("densenet_block", DenseBlockNet, images, (4, 6, 8, 10), 2, "fc"),
    ModelCase("mobilenet_v2_style", MobileNetV2Style, images, (8, 12, 16, 16, 24, 36), 2, "classifier"),
    ModelCase("squeeze_excite", SENet, images, (2, 6, 8), 2, "classifier"),
    ModelCase("layer_scale", LayerScaleNet, images, (8, 12), 2, "classifier"),
    ModelCase("channels_last_scale", ChannelsLastScaleNet, images, (8, 32), 2, "classifier"),
    ModelCase("convnext_block", ConvNeXtBlockNet, images, (8, 32), 2, "classifier", across_norm=True),
    ModelCase("shared_module", SharedModuleNet, images, (8, 12), 2, "classifier"),
    ModelCase("channel_split", ChannelSplitNet, images, (4, 4, 4, 6, 12), 2, "classifier"),
    ModelCase("uneven_split", UnevenSplitNet, images, (3, 4, 5, 6, 12), 2, "classifier"),
    ModelCase("channel_shuffle", ChannelShuffleNet, images, (8, 10), 2, "classifier"),
    ModelCase("grouped_conv", GroupedConvNet, images, (8, 10), 2, "classifier", units={8: 2}),
    ModelCase("nonlinear_head", NonlinearHeadNet, images, (NUM_CLASSES, 8), 1, "classifier"),
]}


# -- teachers ----------------------------------------------------------------------------------


_KNOWN_PARAMETRIC = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter and normalisation buffer non-trivial random values, in place.

    Weights keep their default init scale (redrawn from ``seed``); norm affine weights are
    U(0.5, 1.5), biases N(0, 0.2), BN running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2),
    num_batches_tracked in [1, 10 000), and any other parameter (layer scales) U(0.5, 1.5).
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(t.shape, generator=generator, dtype=t.dtype)

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            bound = 1.0 / max(1, module.weight[0].numel()) ** 0.5
            module.weight.copy_(uniform(module.weight, -bound, bound) * 3 ** 0.5)
            if module.bias is not None:
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
        elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(uniform(module.weight, 0.5, 1.5))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(0.5 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(uniform(module.running_var, 0.5, 2.0))
            if getattr(module, "num_batches_tracked", None) is not None:
                module.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (), generator=generator)))
        if not isinstance(module, _KNOWN_PARAMETRIC):
            for param in module.parameters(recurse=False):
                param.copy_(uniform(param, 0.5, 1.5))
    return model


def make_teachers(build: Callable[[], nn.Module], n: int, seed: int = 0) -> list[nn.Module]:
    """``n`` eval-mode instances of ``build()`` with different random weights and BN statistics."""
    teachers = []
    for t in range(n):
        torch.manual_seed(seed * 1000 + t)
        teachers.append(randomize_(build(), seed * 1000 + t).eval())
    return teachers


def clone_for_loading(teacher: nn.Module) -> nn.Module:
    """A fresh instance of the teacher's class: the no-arg constructor if it has one that builds the
    teacher's architecture (same state_dict keys and shapes), else a deepcopy of the teacher.

    (torchvision's ``DenseNet()`` is densenet121 and ``SqueezeNet()`` version 1_0 whatever the
    teacher is: their no-arg instances are a different architecture.)
    """
    try:
        fresh = type(teacher)()
    except TypeError:
        return copy.deepcopy(teacher)
    want = {k: v.shape for k, v in teacher.state_dict().items()}
    have = {k: v.shape for k, v in fresh.state_dict().items()}
    return fresh if have == want else copy.deepcopy(teacher)


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Teachers differ in every tensor, BatchNorm statistics included (as trained teachers do)."""
    return perturb(model, seed)

"""The benchmark baselines against independent computations.

Weight matching must undo a hand-made permutation of a teacher's hidden channels exactly; the
permutation is written out per layer here (not through the coupling groups) so the test does
not share code with what it checks. BatchNorm re-estimation must give the batch statistics
computed by hand, and magnitude scores the norms computed from the big student's weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import baselines  # noqa: E402

import graphmerge  # noqa: E402
from graphmerge.examples.mlp import SineMLP  # noqa: E402
from graphmerge.examples.mnist1d_cnn import MNIST1DCNN  # noqa: E402


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and statistics (fresh ones are 1/0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=generator))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return model


def _permute_mlp(model: SineMLP, perm: torch.Tensor) -> SineMLP:
    other = SineMLP(len(perm))
    with torch.no_grad():
        other.fc1.weight.copy_(model.fc1.weight[perm])
        other.fc1.bias.copy_(model.fc1.bias[perm])
        other.fc2.weight.copy_(model.fc2.weight[:, perm])
        other.fc2.bias.copy_(model.fc2.bias)
    return other


def _permute_bn(bn: nn.BatchNorm1d, perm: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).copy_(getattr(bn, name)[perm].clone())


def _permute_cnn(model: MNIST1DCNN, p_res: torch.Tensor, p_mid: torch.Tensor, p_head: torch.Tensor) -> MNIST1DCNN:
    """Hand-written: the residual stream (stem, bn, block output, conv input), the block's inner
    channels, and the head channels (each owning 10 consecutive features of fc's input)."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.stem.weight.copy_(model.stem.weight[p_res])
        _permute_bn(other.bn, p_res)
        other.block.conv1.weight.copy_(model.block.conv1.weight[p_mid][:, p_res])
        _permute_bn(other.block.bn1, p_mid)
        other.block.conv2.weight.copy_(model.block.conv2.weight[p_res][:, p_mid])
        _permute_bn(other.block.bn2, p_res)
        other.conv.weight.copy_(model.conv.weight[p_head][:, p_res])
        _permute_bn(other.bn_head, p_head)
        columns = (p_head[:, None] * 10 + torch.arange(10)).reshape(-1)
        other.fc.weight.copy_(model.fc.weight[:, columns])
    return other


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_weight_matching_recovers_a_permuted_mlp() -> None:
    torch.manual_seed(0)
    a = SineMLP()
    perm = torch.randperm(100)
    b = _permute_mlp(a, perm)
    x = torch.rand(32, 1)
    torch.testing.assert_close(b(x), a(x))  # the hand permutation keeps the function
    groups = graphmerge.analyze(a, (x,))
    aligned, perms = baselines.weight_matching(a, b, groups)
    _assert_same_state(aligned, a)
    assert len(perms) == 1


def test_weight_matching_recovers_a_permuted_residual_cnn() -> None:
    torch.manual_seed(1)
    a = _randomise_bn(MNIST1DCNN(), 1).eval()
    b = _permute_cnn(a, torch.randperm(32), torch.randperm(32), torch.randperm(48)).eval()
    x = torch.randn(4, 1, 40)
    torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-5)
    groups = graphmerge.analyze(a, (x,))
    aligned, perms = baselines.weight_matching(a, b, groups)
    _assert_same_state(aligned, a)
    assert sorted(len(p) for p in perms.values()) == [32, 32, 48]


def test_rebasin_average_of_a_model_and_its_permutation_is_the_model() -> None:
    torch.manual_seed(2)
    a = SineMLP()
    b = _permute_mlp(a, torch.randperm(100))
    merged = baselines.rebasin_average([a, b], graphmerge.analyze(a, (torch.rand(4, 1),)))
    for key, value in a.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value)


def test_average_is_the_elementwise_mean() -> None:
    torch.manual_seed(3)
    a, b = SineMLP(), SineMLP()
    merged = baselines.average([a, b])
    torch.testing.assert_close(merged.fc1.weight, (a.fc1.weight + b.fc1.weight) / 2)
    torch.testing.assert_close(merged.fc2.bias, (a.fc2.bias + b.fc2.bias) / 2)


def test_bn_reestimation_gives_the_batch_statistics() -> None:
    torch.manual_seed(4)
    model = _randomise_bn(MNIST1DCNN(), 4).eval()
    x = torch.randn(64, 1, 40)
    baselines.reestimate_bn(model, x, batch_size=64)
    with torch.no_grad():
        pre_bn = model.stem(x)  # the first BatchNorm's input, computed by hand
    torch.testing.assert_close(model.bn.running_mean, pre_bn.mean(dim=(0, 2)))
    torch.testing.assert_close(model.bn.running_var, pre_bn.var(dim=(0, 2), unbiased=True))
    assert not model.training  # the mode is restored


def test_magnitude_scores_are_consumer_input_norms() -> None:
    torch.manual_seed(5)
    teachers = [SineMLP(), SineMLP()]
    big = graphmerge.widen(teachers, (torch.rand(4, 1),))
    scores = baselines.magnitude_scores(big)
    (gid, got), = scores.items()
    expected = torch.cat([t.fc2.weight[0].abs() for t in teachers]) / 2  # the head holds weight / N
    torch.testing.assert_close(got.float(), expected.detach())


def test_magnitude_scores_sum_a_flatten_run() -> None:
    torch.manual_seed(6)
    teachers = [MNIST1DCNN(), MNIST1DCNN()]
    big = graphmerge.widen([t.eval() for t in teachers], (torch.randn(2, 1, 40),))
    scores = baselines.magnitude_scores(big)
    head = next(s for s in scores.values() if len(s) == 96)
    expected = torch.cat([t.fc.weight.view(10, 48, 10).pow(2).sum(dim=(0, 2)).sqrt() / 2 for t in teachers])
    torch.testing.assert_close(head.float(), expected.detach())


@pytest.mark.parametrize("seed", [0, 1])
def test_random_scores_pick_width_channels(seed: int) -> None:
    big = graphmerge.widen([SineMLP(), SineMLP()], (torch.rand(4, 1),))
    student = graphmerge.compress(big, baselines.random_scores(big, seed))
    assert isinstance(student, SineMLP) and student.fc1.weight.shape == (100, 1)

"""The public accessors the benchmarks use: the channels compress keeps, and what it must equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphmerge
from graphmerge.examples.mlp import SineMLP
from graphmerge.examples.mnist1d_cnn import MNIST1DCNN


def _gated_mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    gated = graphmerge.add_gates(graphmerge.widen([SineMLP(8), SineMLP(8)], (torch.rand(4, 1),)), seed=seed)
    with torch.no_grad():
        (log_alpha,) = gated.gates.log_alpha.values()
        log_alpha.copy_(torch.randn(log_alpha.shape))
    return gated


def test_kept_channels_are_the_top_half_of_the_gate_scores() -> None:
    gated = _gated_mlp(0)
    (gid, kept), = graphmerge.kept_channels(gated).items()
    (log_alpha,) = gated.gates.log_alpha.values()
    expected = np.sort(np.argsort(-log_alpha.detach().numpy(), kind="stable")[:8])  # width 8 of 2 x 8
    assert kept.tolist() == expected.tolist()
    assert graphmerge.kept_channels(gated, "teacher:1")[gid].tolist() == list(range(8, 16))


def test_kept_channels_by_gates_needs_gates() -> None:
    big = graphmerge.widen([SineMLP(8), SineMLP(8)], (torch.rand(4, 1),))
    with pytest.raises(graphmerge.GraphMergeError, match="add_gates"):
        graphmerge.kept_channels(big)


@pytest.mark.parametrize("build, shape", [(lambda: SineMLP(8), (64, 1)), (MNIST1DCNN, (16, 1, 40))])
def test_the_closed_gates_reference_computes_what_compress_returns(build, shape) -> None:
    """I3 on inputs the certificate never saw, through the public functions only."""
    torch.manual_seed(1)
    teachers = [build().eval(), build().eval()]
    gated = graphmerge.add_gates(graphmerge.widen(teachers, (torch.randn(2, *shape[1:]),)), seed=1)
    with torch.no_grad():
        for log_alpha in gated.gates.log_alpha.values():
            log_alpha.copy_(torch.randn(log_alpha.shape) * 3)
    gated.eval()
    x = torch.randn(*shape)
    student = graphmerge.compress(gated, "gates").eval()
    reference = graphmerge.closed_gates_reference(gated).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(x), reference(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(gated(x), reference(x), atol=1e-3)  # closing the dropped gates matters

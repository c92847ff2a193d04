"""The invariants I1-I4 of DESIGN.md on random transformer architectures (tests/randformer.py).

The references are the independent computations of tests/test_invariants.py; here everything
runs in float64 (teachers and float inputs are converted before the analysis and widen), I1 is
held to 1e-6 relative, and I3 uses one-teacher masks only: LayerNorm and RMSNorm span the
widened residual stream, so masks mixing teachers change the statistics the kept channels are
normalised with (as for convnext_block in test_invariants.py).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphmerge
from tests.models import make_teachers
from tests.randformer import BATCH, CLASSES, build, example_inputs, specs, unsupported_patterns
from tests.test_invariants import check_i2, check_i3, check_i4, mean_of_teachers, output_layer_name

torch.set_num_threads(1)


@torch.no_grad()
def check_i1_float64(teachers, big, inputs) -> None:
    expected = mean_of_teachers(teachers, inputs)
    got = big.eval()(*inputs)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    error = (got - expected).abs().max().item()
    assert error <= 1e-6 * scale, f"I1 big(x) vs mean_t teacher_t(x): max abs error {error:.3g} > 1e-6 x {scale:.3g}"


def check_transformer(spec, n: int, seed: int) -> None:
    teachers = [t.double() for t in make_teachers(lambda: build(spec), n, seed)]
    inputs = tuple(x.double() if x.is_floating_point() else x for x in example_inputs(spec))
    assert teachers[0](*inputs).shape == (BATCH, CLASSES)
    groups = graphmerge.analyze(teachers[0], inputs)
    reasons = [g.reason for g in groups.internal_pinned]
    if reasons:
        # Pinning inside the network is allowed only for a listed pattern, with that pattern's reason.
        patterns = unsupported_patterns(spec)
        unexplained = [r for r in reasons if not any(text in (r or "") for _, text in patterns)]
        assert patterns and not unexplained, f"pinned inside for no known reason: {unexplained}"
        return  # I1 cannot hold with groups pinned inside
    assert groups.widened, "no group to widen"
    big = graphmerge.widen(teachers, inputs, groups=groups)
    check_i1_float64(teachers, big, inputs)
    check_i2(teachers, big, output_layer_name(teachers[0], inputs))
    check_i3(big, groups, n, inputs, seed, mixed=False)
    check_i4(graphmerge.compress(big, f"teacher:{n - 1}"), teachers[0], inputs)


# Known gaps (found by this test, hypothesis seed 1; reported in the transformers issue): some random
# specs still pin at SDPA ("q, k or v is not laid out as heads x head_dim"), one gives a big student
# whose attention is not the teachers' mean (refused by the certificate, not returned), and one
# recovers q/k/v weights in another head order (I2 not bitwise). Run with `make test-gaps`.
@pytest.mark.known_gaps
@settings(deadline=None, max_examples=25)
@given(spec=specs(), n=st.sampled_from([2, 2, 3]), seed=st.integers(0, 2**16))
def test_random_transformers_satisfy_the_invariants(spec, n: int, seed: int) -> None:
    """No group pinned inside (unless a listed pattern explains every pin), then I1-I4."""
    check_transformer(spec, n, seed)

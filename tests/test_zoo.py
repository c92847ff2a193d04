"""The torchvision classification zoo: every model is analysed; I1/I2/I4 on a representative subset
(every model with GRAPHMERGE_FULL_ZOO=1). Models are built with weights=None."""

from __future__ import annotations

import pytest
import torch

import graphmerge
from tests.models import make_teachers
from tests.test_invariants import check_i1, check_i2, check_i4, output_layer_name
from tests.zoo_models import (
    ALL_MODELS,
    EXPECTED_INTERNAL_PINNED,
    REPRESENTATIVE,
    build,
    example_inputs,
    full_zoo,
)

torch.set_num_threads(1)  # two xdist workers on two cores

pytestmark = pytest.mark.zoo

INVARIANT_MODELS = [n for n in (ALL_MODELS if full_zoo() else REPRESENTATIVE) if n not in EXPECTED_INTERNAL_PINNED]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_zoo_model_is_analysed(name: str) -> None:
    groups = graphmerge.analyze(build(name), example_inputs(name))
    assert groups.widened, f"{name}: no widened group"
    assert all(g.reason for g in groups.pinned), f"{name}: a pinned group has no reason"
    boundary = {" ".join(g.reason.split(" ")[:2]) for g in groups.pinned if g not in groups.internal_pinned}
    # "not a channel": a parameter dim that is no channel (position tables); pinned, not internal.
    assert "graph input" in boundary and boundary <= {"graph input", "graph output", "not a"}, boundary
    if name not in EXPECTED_INTERNAL_PINNED:
        assert "graph output" in boundary, boundary
    internal = sorted({g.reason for g in groups.internal_pinned})
    if name in EXPECTED_INTERNAL_PINNED:
        assert internal, f"{name} no longer pins inside: remove it from EXPECTED_INTERNAL_PINNED"
    else:
        assert internal == [], f"{name}: groups pinned inside the network: {internal[:3]}"


@pytest.mark.parametrize("name", INVARIANT_MODELS)
def test_zoo_model_invariants(name: str) -> None:
    """I1 (big = mean of teachers), I2 (bitwise recovery of each teacher), I4 (class round trip)."""
    inputs = example_inputs(name)
    teachers = make_teachers(lambda: build(name), 2, seed=1)
    big = graphmerge.widen(teachers, inputs)
    check_i1(teachers, big, inputs)
    check_i2(teachers, big, output_layer_name(teachers[0], inputs))
    check_i4(graphmerge.compress(big, "teacher:1"), teachers[0], inputs)

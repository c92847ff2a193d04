"""Tied hard-concrete gates: distribution, tying, placement, loss, and compression after gating."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from graphmerge.passes.gate import GATES
from graphmerge.passes.gate_budget import (
    DECISION_LEVEL,
    budget_projection,
    budget_target,
    decided_projection,
    decision_strength,
)
from graphmerge.passes.gate_ops import apply_gate, gather_gate_values
from graphmerge.passes.hard_concrete import HardConcreteGates
from graphmerge.passes.ir import display_name, widen_info

import graphmerge
from graphmerge.examples.resnet20 import build_model as resnet20

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


def _teachers(n: int = 2):
    teachers = []
    for seed in range(n):
        torch.manual_seed(seed)
        teachers.append(resnet20().eval())
    return teachers


@pytest.fixture(scope="module")
def big():
    x = torch.randn(2, 3, 32, 32)
    return graphmerge.widen(_teachers(), (x,)).eval(), x


def test_sampled_gates_match_the_closed_form_probabilities():
    log_alpha = torch.tensor([-2.0, -0.5, 0.0, 0.7, 2.5])
    gates = HardConcreteGates({0: 5}, init_std=0.0)
    with torch.no_grad():
        gates.log_alpha["g0"].copy_(log_alpha)
    gates.train()
    torch.manual_seed(0)
    samples = gates(torch.zeros(200_000))[:, :5]
    la = log_alpha.double().numpy()
    p_open = 1 / (1 + np.exp(-(la - BETA * math.log(-GAMMA / ZETA))))
    threshold = (1 - GAMMA) / (ZETA - GAMMA)  # s above it clamps to exactly 1
    p_one = 1 / (1 + np.exp(-(la - BETA * math.log(threshold / (1 - threshold)))))
    assert np.allclose((samples > 0).double().mean(0).numpy(), p_open, atol=0.005)
    assert np.allclose((samples == 1).double().mean(0).numpy(), p_one, atol=0.005)
    assert torch.allclose(gates.prob_open(0).double(), torch.as_tensor(p_open), atol=1e-6)


def test_eval_gate_is_deterministic_and_follows_the_formula():
    gates = HardConcreteGates({3: 4}, init_std=1.0, generator=torch.Generator().manual_seed(1)).eval()
    first, second = gates(torch.zeros(7)), gates(torch.zeros(7))
    assert torch.equal(first, second)
    la = gates.log_alpha["g3"].detach()
    expected = (torch.sigmoid(la) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    assert torch.allclose(first[0, :4], expected)
    assert first[0, 4] == 1.0  # the trailing "no gate" entry


def test_gates_sit_at_every_consumer_of_widened_groups(big):
    model, _ = big
    gated = graphmerge.add_gates(model)
    products = [n for n in gated.graph_module.graph.nodes if getattr(n.target, "__name__", "") == "apply_gate"]
    # ResNet20 has 21 convs and one linear; all but the first conv (reading the pinned image) read
    # widened channels. Hand count: 18 block convs + 2 projection shortcuts + fc = 21 sites. Each
    # projection shortcut reads the same activation as its block's first conv, with the same
    # gates: the two share one gated product, so 19 products feed 21 consumers.
    consumers = [display_name(user) for n in products for user in n.users]
    assert len(consumers) == 21 and len(set(consumers)) == 21 and len(products) == 19
    shared = sorted(sorted(display_name(u) for u in n.users) for n in products if len(n.users) > 1)
    assert shared == [["layers.3.conv1", "layers.3.shortcut.0"], ["layers.6.conv1", "layers.6.shortcut.0"]]
    assert "conv1" not in consumers and "fc" in consumers


def test_one_realisation_per_forward_shared_by_every_site_of_a_group(big):
    model, x = big
    gated = graphmerge.add_gates(model).train()
    calls = []
    handle = gated.gates.register_forward_hook(lambda module, args, out: calls.append(out))
    gated(x)
    handle.remove()
    assert len(calls) == 1 and calls[0].shape[0] == x.shape[0]
    info = widen_info(model)[1]
    stream = max(info.groups.widened, key=lambda g: len(g.gate_sites))  # a residual stream
    assert len(stream.gate_sites) >= 3
    offset = gated.gates.offsets[stream.id]
    wanted = set(range(offset, offset + 2 * stream.width))
    seen = []
    for node in gated.graph_module.graph.nodes:
        if getattr(node.target, "__name__", "") != "apply_gate":
            continue
        index = getattr(gated.graph_module, node.args[2].target).numpy()
        entries = index[np.isin(index, list(wanted))]
        if entries.size:
            seen.extend([entries] * len(node.users))  # one gated product may feed several sites
    # every site of the group reads the same gate entries in the same big-channel order
    assert len(seen) == len(stream.gate_sites)
    assert all(np.array_equal(s, seen[0]) for s in seen) and set(seen[0].tolist()) == wanted


def test_gate_loss_is_the_sum_of_squared_distances_to_one_half(big):
    model, _ = big
    gated = graphmerge.add_gates(model, init_std=0.5, seed=3)
    expected = 0.0
    for log_alpha in gated.gates.log_alpha.values():
        p = torch.sigmoid(log_alpha.detach().double() - BETA * math.log(-GAMMA / ZETA))
        expected += (0.5 - p.mean().item()) ** 2
    assert gated.gate_loss().item() == pytest.approx(expected, rel=1e-5)
    gated.gate_loss().backward()
    assert all(p.grad is not None for p in gated.gate_parameters())


def test_big_student_is_not_modified_by_add_gates(big):
    model, x = big
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graphmerge.add_gates(model)
    assert not hasattr(model, GATES)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_all_gates_open_at_full_ratio_reproduces_the_big_student(big):
    model, x = big
    gated = graphmerge.add_gates(model).eval()
    gated.set_gates({gid: torch.ones(gated.gates.log_alpha[f"g{gid}"].numel(), dtype=torch.bool)
                     for gid in gated.gates.group_ids})
    wide = graphmerge.compress(gated, "gates", ratio=1.0).eval()
    with torch.no_grad():
        assert torch.allclose(wide(x), model(x), atol=1e-5)
    assert sum(p.numel() for p in wide.parameters()) == sum(p.numel() for p in model.parameters())


def test_half_ratio_of_one_teachers_gates_equals_compressing_to_that_teacher(big):
    model, x = big
    gated = graphmerge.add_gates(model).eval()
    info = widen_info(model)[1]
    gated.set_gates({g.id: torch.arange(2 * g.width) >= g.width for g in info.groups.widened})
    half = graphmerge.compress(gated, "gates", ratio=0.5).eval()
    teacher_one = graphmerge.compress(model, "teacher:1").eval()
    with torch.no_grad():
        assert torch.allclose(half(x), teacher_one(x), atol=1e-5)
    teacher = _teachers()[0]
    assert sum(p.numel() for p in half.parameters()) == sum(p.numel() for p in teacher.parameters())


def test_teacher_share_counts_kept_channels_per_teacher(big):
    model, _ = big
    gated = graphmerge.add_gates(model)
    info = widen_info(model)[1]
    gated.set_gates({g.id: torch.arange(2 * g.width) < g.width for g in info.groups.widened})
    assert all(share == [g.width, 0] for g in info.groups.widened
               for share in [gated.teacher_share()[g.id]])


def test_bad_gate_constants_and_masks_are_explained(big):
    model, _ = big
    with pytest.raises(graphmerge.GraphMergeError, match="gamma < 0"):
        graphmerge.add_gates(model, gamma=0.2)
    gated = graphmerge.add_gates(model)
    with pytest.raises(graphmerge.GraphMergeError, match="gates but the mask has"):
        gated.set_gates({gated.gates.group_ids[0]: [True]})
    with pytest.raises(graphmerge.GraphMergeError, match="not of the form"):
        graphmerge.compress(model, "teacher:x")
    with pytest.raises(graphmerge.GraphMergeError, match="graphmerge metadata"):
        graphmerge.compress(torch.nn.Linear(2, 2))


def test_gate_phase_reaches_half_open_and_compression_matches_the_gated_student():
    """A short gate phase on a small regression problem: every group ends with width gates open
    (the expected open count Σ P[g > 0] within one channel of width); rounding
    the learned gates to 0/1 (top width by score), the compressed student computes what the
    eval-mode gated big student computes (I3)."""
    torch.manual_seed(0)
    x = torch.rand(512, 1)
    y = torch.sin(6 * x)
    teachers = []
    for seed in range(2):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(1, 12), torch.nn.ReLU(), torch.nn.Linear(12, 12),
                                  torch.nn.ReLU(), torch.nn.Linear(12, 1))
        teachers.append(net.eval())
    big = graphmerge.widen(teachers, (x[:2],))
    gated = graphmerge.add_gates(big, seed=0).train()
    weights = torch.optim.SGD(gated.weight_parameters(), lr=0.01, momentum=0.9)
    gates = torch.optim.SGD(gated.gate_parameters(), lr=0.5, momentum=0.9)
    lam = 1.0
    for step in range(600):
        if step % 20 == 0:
            lam += 0.5 * math.sqrt(lam)
        batch = torch.randint(0, 512, (64,))
        loss = torch.nn.functional.mse_loss(gated(x[batch]), y[batch]) + lam * gated.gate_loss()
        weights.zero_grad()
        gates.zero_grad()
        loss.backward()
        weights.step()
        gates.step()
    gated.eval()
    info = widen_info(big)[1]
    masks = {}
    for group in info.groups.widened:
        assert abs(gated.expected_open()[group.id] - group.width) <= 1.0
        scores = gated.gate_scores()[group.id]
        masks[group.id] = torch.zeros(2 * group.width, dtype=torch.bool)
        masks[group.id][torch.argsort(-scores, stable=True)[:group.width]] = True
    gated.set_gates(masks)
    student = graphmerge.compress(gated, "gates").eval()
    with torch.no_grad():
        assert torch.allclose(student(x), gated(x), atol=1e-5)


def test_budget_projection_shifts_each_group_over_budget_onto_it():
    generator = torch.Generator().manual_seed(0)
    sizes = [5, 8, 3]
    segments = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    log_alpha = torch.randn(4, sum(sizes), generator=generator, dtype=torch.float64) * 2
    log_alpha[:, 5:13] -= 6.0  # group 1 starts below the budget
    shift, target = 0.3, 0.4
    projected = budget_projection(log_alpha, segments, target, shift)
    for row in range(4):
        for g, (lo, hi) in enumerate([(0, 5), (5, 13), (13, 16)]):
            before, after = log_alpha[row, lo:hi], projected[row, lo:hi]
            mean_before = float(torch.sigmoid(before - shift).mean())
            mean_after = float(torch.sigmoid(after - shift).mean())
            if mean_before <= target:
                assert torch.equal(before, after), (row, g)
            else:
                assert mean_after == pytest.approx(target, abs=1e-9) and mean_after <= target + 1e-12
                delta = after - before  # one constant per group: the ranking is kept
                assert float(delta.max() - delta.min()) < 1e-9 and float(delta[0]) < 0


@pytest.mark.parametrize("direction", ["uniform", "gradient"])
def test_budget_projection_finds_the_bisection_root_on_hard_inputs(direction: str):
    """Against a 200-step bisection written here: gates far open, far closed, undecided and mixed,
    targets near 0 and near 1. Each over-budget group's shift is the bisection's to 1e-7 and its
    mean ends on the target, never above it."""
    generator = torch.Generator().manual_seed(1)
    sizes = [7, 30, 4, 12]
    segments = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    rows = [torch.randn(sum(sizes), generator=generator, dtype=torch.float64) * scale for scale in (0.01, 1, 5, 30)]
    rows.append(torch.cat([torch.full((20,), 40.0), torch.full((33,), -40.0)]).double())
    log_alpha = torch.stack(rows) + 3.0
    shift = BETA * math.log(-GAMMA / ZETA)
    for target in (0.02, 1 / 3, 0.5, 0.97):
        projected = budget_projection(log_alpha, segments, target, shift, direction=direction)
        for row in range(len(rows)):
            x = log_alpha[row] - shift
            p = torch.sigmoid(x)
            weight = (4 * p * (1 - p)).clamp_min(0.05) if direction == "gradient" else torch.ones_like(x)
            for g in range(4):
                part = segments == g
                if float(p[part].mean()) <= target:
                    assert torch.equal(projected[row, part], log_alpha[row, part])
                    continue
                low, high = -1e5, 0.0
                for _ in range(200):
                    mid = (low + high) / 2
                    low, high = (low, mid) if float(torch.sigmoid(x[part] + mid * weight[part]).mean()) > target \
                        else (mid, high)
                moved = (projected[row, part] - log_alpha[row, part]) / weight[part]
                assert float(moved.max() - moved.min()) < 1e-7
                assert float(moved[0]) == pytest.approx(low, rel=1e-7, abs=1e-7), (target, row, g)
                mean_after = float(torch.sigmoid(projected[row, part] - shift).mean())
                assert mean_after <= target and mean_after == pytest.approx(target, abs=1e-9)


def test_budget_target_falls_linearly_to_one_over_n_then_holds():
    assert budget_target(0.0, 2) == 1.0
    assert budget_target(0.25, 2) == pytest.approx(0.75)
    assert budget_target(0.5, 2) == 0.5 and budget_target(0.9, 2) == 0.5
    assert budget_target(0.5, 3, ramp=1.0) == pytest.approx(2 / 3)
    with pytest.raises(Exception, match="budget_ramp"):
        budget_target(0.5, 2, ramp=0.0)


def test_gated_student_projection_meets_the_budget_per_group(big):
    gated = graphmerge.add_gates(big[0], seed=0)
    gated.project_to_budget(0.5)
    assert all(abs(v - 0.5) < 1e-5 for v in gated.open_fraction().values())


def test_hard_concrete_sample_and_its_gradient_follow_the_formula():
    """One training-mode draw against the formula written out in float64 on the same uniforms."""
    gates = HardConcreteGates({0: 5, 3: 7}, init_std=1.0, generator=torch.Generator().manual_seed(2)).train()
    torch.manual_seed(3)
    out = gates(torch.zeros(4))
    torch.manual_seed(3)
    u = torch.rand(4, 12).clamp(1e-6, 1 - 1e-6).double()
    log_alpha = torch.cat([gates.log_alpha["g0"], gates.log_alpha["g3"]]).detach().double().requires_grad_()
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    expected = (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    assert out.shape == (4, 13) and bool((out[:, 12] == 1).all())
    assert torch.allclose(out[:, :12].double(), expected, atol=1e-6)
    weight = torch.randn(4, 13, generator=torch.Generator().manual_seed(4))
    (out * weight).sum().backward()
    (expected * weight[:, :12].double()).sum().backward()
    grad = torch.cat([gates.log_alpha["g0"].grad, gates.log_alpha["g3"].grad]).double()
    assert torch.allclose(grad, log_alpha.grad, rtol=1e-4, atol=1e-6)


def test_gated_student_matches_a_per_site_reference_in_value_and_gradient(big):
    """add_gates gathers every site's gate values in one index_select per forward; a reference
    that gathers each site's own values by indexing must give the same output and gradients."""
    model, x = big
    gated, reference = (graphmerge.add_gates(model, init_std=0.5, seed=1).train() for _ in range(2))

    def per_site(x, gates, index, dim, values=None):
        shape = [1] * x.ndim
        shape[0], shape[dim % x.ndim] = gates.shape[0], index.numel()
        return x * gates[:, index].reshape(shape)

    graph = reference.graph_module.graph
    for node in graph.nodes:
        if node.target is apply_gate:
            node.target, node.args = per_site, node.args[:4]
    graph.eliminate_dead_code()
    reference.graph_module.recompile()
    assert not any(n.target is gather_gate_values for n in graph.nodes)
    outputs = []
    for student in (gated, reference):
        torch.manual_seed(7)
        out = student(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outputs.append(out.detach())
    assert torch.equal(outputs[0], outputs[1])
    params = dict(reference.named_parameters())
    for name, param in gated.named_parameters():
        assert torch.allclose(param.grad, params[name].grad, rtol=1e-5, atol=1e-7), name


def test_gradient_projection_closes_undecided_gates_first_and_meets_the_budget():
    """Along the mean's gradient 4 P (1 - P): a gate held open (P near 1) barely moves, an
    undecided one (P near 1/2) moves most; the group still ends exactly on the budget."""
    shift = 0.0
    log_alpha = torch.tensor([[6.0, 0.0, 0.2, -0.1]], dtype=torch.float64)
    segments = torch.zeros(4, dtype=torch.long)
    projected = budget_projection(log_alpha, segments, 0.5, shift, direction="gradient")
    assert float(torch.sigmoid(projected).mean()) == pytest.approx(0.5, abs=1e-9)
    moved = (log_alpha - projected)[0]
    p = torch.sigmoid(log_alpha[0])
    expected = (4 * p * (1 - p)).clamp_min(0.05)
    assert torch.allclose(moved / moved[1], expected / expected[1], atol=1e-9)  # proportional to the weights
    assert float(projected[0, 0]) > 5.9 and float(projected[0, 1]) < -0.5
    with pytest.raises(Exception, match="direction"):
        budget_projection(log_alpha, segments, 0.5, shift, direction="sideways")


@pytest.mark.parametrize("direction", ["gradient", "uniform"])
def test_decided_projection_holds_the_decision_and_meets_the_budget_from_both_sides(direction: str):
    """Kept gates end at or above the level and do not move further; dropped ones at or below
    minus the level; every group's mean P[g > 0] (written out here) is exactly the target, also for
    a group that starts below it (raised) and one that starts above it (lowered)."""
    generator = torch.Generator().manual_seed(0)
    sizes = [6, 9, 4]
    segments = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    log_alpha = torch.randn(sum(sizes), generator=generator, dtype=torch.float64) * 3
    log_alpha[6:15] -= 12.0  # group 1 far below 1/3 open
    log_alpha[15:] += 8.0  # group 2 far above
    kept = torch.zeros(sum(sizes), dtype=torch.bool)
    kept[[0, 2, 6, 9, 10, 15]] = True  # 1/3 of groups 0 and 1, 1/4 of group 2
    shift, target = BETA * math.log(-GAMMA / ZETA), 1 / 3
    for level in (-2.0, 0.0, DECISION_LEVEL):
        moved = decided_projection(log_alpha, segments, kept, level, target, shift, direction=direction)
        assert torch.equal(moved[kept], log_alpha[kept].clamp_min(level))  # the kept gates stay put
        if level > 0:  # where the kept share is the target; group 2's dropped gates must fill 1/3 - 1/4
            assert bool((moved[:15][~kept[:15]] <= -level).all())
        for lo, hi in [(0, 6), (6, 15), (15, 19)]:
            mean_open = 1 / (1 + torch.exp(-(moved[lo:hi] - shift)))
            assert float(mean_open.mean()) == pytest.approx(target, abs=1e-9), (level, lo)
    with pytest.raises(Exception, match="direction"):
        decided_projection(log_alpha, segments, kept, 0.0, target, shift, direction="sideways")


def test_decision_strength_waits_for_the_budget_then_ramps_and_holds():
    assert decision_strength(0.0) == 0.0 and decision_strength(0.5) == 0.0
    assert decision_strength(0.625) == pytest.approx(0.5) and decision_strength(0.75) == 1.0
    assert decision_strength(0.9) == 1.0 and decision_strength(1.0) == 1.0
    assert decision_strength(0.99, ramp=1.0) == 0.0 and decision_strength(1.0, ramp=1.0) == 1.0


def test_gated_student_decide_keeps_what_compress_keeps_and_compresses_exactly(big):
    """After ``decide`` at full strength the kept channels' eval gates are exactly 1 and the rest
    exactly 0, the channels kept are compress's top 1/N by score (unchanged by the decision), every
    group is 1/2 open, and the compressed student computes what the gated big student computes."""
    model, x = big
    gated = graphmerge.add_gates(model, init_std=1.0, seed=3).eval()
    before = {gid: torch.argsort(-s, stable=True)[: s.numel() // 2] for gid, s in gated.gate_scores().items()}
    gated.decide(0.5, 1.0)
    for gid, value in gated.eval_gate_values().items():
        kept = torch.zeros_like(value, dtype=torch.bool)
        kept[before[gid]] = True
        assert bool((value[kept] == 1).all()) and bool((value[~kept] == 0).all()), gid
    assert all(abs(v - 0.5) < 1e-5 for v in gated.open_fraction().values())
    student = graphmerge.compress(gated, "gates").eval()
    with torch.no_grad():
        assert torch.allclose(student(x), gated(x), atol=1e-5)

"""What a user with N trained models could do instead of merging: budgets, FLOPs, averages, distillation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from graphmerge.alternatives import plan_budget, reestimate_batchnorm, spend, train_flops_per_sample, weight_average
from graphmerge.errors import GraphMergeError
from graphmerge.recipe import train


def test_plan_spends_the_budget_to_within_one_sample():
    assert plan_budget(99.0, 10.0, 1000) is not None and plan_budget(9.0, 10.0, 1000) is None
    for flops, per, n in ((1e6, 7.0, 1000), (123_456.0, 3.5, 50), (10.0, 10.0, 3)):
        p = plan_budget(flops, per, n)
        bought = int(flops // per)
        assert p.epochs == math.ceil(bought / n) and p.samples <= n
        assert bought - p.epochs * p.samples < p.epochs  # the remainder is below one sample per epoch
        assert p.flops == p.epochs * p.samples * per <= flops


def test_train_flops_of_a_linear_layer_count_forward_and_backward():
    model = nn.Linear(6, 4)
    data = TensorDataset(torch.randn(8, 6), torch.randint(0, 4, (8,)))
    # forward x @ W^T: 2*6*4 per sample; backward: the weight's gradient, 2*6*4 (the data needs none)
    assert train_flops_per_sample(model, data, batch_size=8) == 2 * 2 * 6 * 4
    deeper = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))  # the second layer's input needs a gradient
    data = TensorDataset(torch.randn(8, 6), torch.randint(0, 2, (8,)))
    assert train_flops_per_sample(deeper, data, batch_size=8) == 2 * 2 * 6 * 4 + 3 * 2 * 4 * 2


def test_weight_average_is_the_mean_and_batchnorm_is_reestimated():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(3)]
    for m in models:
        m[1].running_mean.normal_()
    x = torch.randn(32, 3)
    averaged = weight_average(models, bn_data=TensorDataset(x, torch.zeros(32)), batch_size=32)
    mean_weight = sum(m[0].weight for m in models) / 3
    torch.testing.assert_close(averaged[0].weight, mean_weight)
    hidden = x @ mean_weight.T + sum(m[0].bias for m in models) / 3
    torch.testing.assert_close(averaged[1].running_mean, hidden.mean(0).detach())
    torch.testing.assert_close(averaged[1].running_var, hidden.var(0).detach())
    with pytest.raises(GraphMergeError, match="one architecture"):
        weight_average([nn.Linear(3, 4), nn.Linear(3, 5)])
    assert reestimate_batchnorm(nn.Linear(2, 2), TensorDataset(x, x)) is not None  # no BatchNorm: unchanged


def test_spend_trains_a_copy_on_the_planned_subset():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    data = TensorDataset(torch.randn(40, 5), torch.randint(0, 3, (40,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = spend(model, data, plan_budget(10 * 25.0, 10.0, 40), seed=3, batch_size=8)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched
    assert not torch.equal(trained.weight, model.weight)
    assert spend(model, data, None) is not model


def test_train_distills_from_an_ensemble_as_written_out_by_hand():
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    data = TensorDataset(x, y)
    teachers = [torch.nn.Linear(5, 3) for _ in range(2)]
    model = torch.nn.Linear(5, 3)
    reference = torch.nn.Linear(5, 3)
    reference.load_state_dict(model.state_dict())
    # one full batch, one SGD step (momentum's first step is the plain gradient step)
    train(model, data, epochs=1, batch_size=16, lr=0.1, distill_from=teachers, distill_weight=0.3, temperature=2.0)
    with torch.no_grad():
        target = (teachers[0](x) + teachers[1](x)) / 2
    out = reference(x)
    kl = (torch.softmax(target / 2, 1) * (torch.log_softmax(target / 2, 1) - torch.log_softmax(out / 2, 1))).sum(1)
    loss = 0.7 * torch.nn.functional.cross_entropy(out, y) + 0.3 * kl.mean() * 4
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference.state_dict()[name])
    with pytest.raises(GraphMergeError, match="distill_from is None"):
        train(torch.nn.Linear(5, 3), data, epochs=1, temperature=2.0)


def test_language_model_distillation_skips_padded_positions():
    from graphmerge.training import distill_term

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3:] = -100
    term = distill_term("causal_lm", temperature=2.0)(student, teacher, labels)
    p = torch.softmax(teacher / 2, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(student / 2, -1))).sum(-1)
    expected = kl[labels != -100].mean() * 4
    torch.testing.assert_close(term, expected)


def test_the_demo_prices_its_alternatives_at_the_merges_extra_flops(capsys):
    from graphmerge.alternatives import train_flops_per_sample as flops
    from graphmerge.cli_merge import alternative_rows
    from graphmerge.examples.mnist1d_cnn import MNIST1DCNN
    from graphmerge.recipe import merge

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(96) % 10
    data = TensorDataset(torch.randn(96, 1, 40, generator=generator) + labels.view(-1, 1, 1) / 3, labels)
    settings = {"teacher_epochs": 1, "gate_epochs": 1, "finetune_epochs": 1, "batch_size": 32, "seed": 0}
    result = merge(lambda: MNIST1DCNN(channels=4, head_channels=4), data, val_data=data, preflight=False,
                   **settings)
    rows = alternative_rows(result, data, data, settings)
    assert [name.split(",")[0] for name, _ in rows] == [
        f"best teacher ({max(range(2), key=lambda i: result.summary['teachers'][i])}) fine-tuned",
        "weight average (BN re-estimated) fine-tuned"]
    assert all(0 <= metrics["acc"] <= 1 for _, metrics in rows)
    import graphmerge

    small = flops(result.teachers[0], data, batch_size=32)
    gated = flops(graphmerge.add_gates(graphmerge.widen(result.teachers, (data.tensors[0][:2],))), data, batch_size=32)
    spent = 96 * (gated + small)  # one gate epoch of the gated big student, one fine-tuning epoch
    expected = plan_budget(spent, small, 96)
    assert f"{expected.epochs} x {expected.samples} samples" in rows[0][0]
    assert "extra training FLOPs" in capsys.readouterr().out

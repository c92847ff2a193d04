"""graphmerge.passes.capture: the torch.export front end (ATen graph, state names, modes, pytrees, errors)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings

import pytest
import torch
from graphmerge.passes.capture import CaptureWarning, capture, node_shape, node_shapes, source_line
from graphmerge.passes.errors import TraceError
from graphmerge.passes.mode_ops import ModeBatchNorm, ModeOp
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int


class SmallCNN(nn.Module):
    """Two convs with BatchNorm (one with cumulative-average momentum), InstanceNorm with running
    stats, feature dropout and dropout: every mode-dependent op kind a CNN has."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8, momentum=None)
        self.inorm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.drop2d = nn.Dropout2d(0.2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.drop2d(torch.relu(self.inorm(self.bn2(self.conv2(h)))))
        return self.fc(self.drop(h.mean((2, 3))))


def _randomise_stats(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase)) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.num_batches_tracked.fill_(3)
    return model.eval()


def _small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return _randomise_stats(SmallCNN())


def test_eval_parity_state_names_and_shapes() -> None:
    model = _small_cnn()
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,))
    assert type(gm) is not type(model) and isinstance(gm, torch.fx.GraphModule)
    assert set(gm.state_dict()) == set(model.state_dict())
    assert gm.get_parameter("conv1.weight") is model.conv1.weight  # shared, as with symbolic_trace
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"conv1.weight", "bn1.running_mean", "fc.bias"} <= targets
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=0)
    conv = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    assert node_shape(conv) == (2, 8, 8, 8) and node_shapes(conv) == ((2, 8, 8, 8),)
    line = inspect.getsourcelines(SmallCNN.forward)[1] + 1
    assert source_line(conv) == f"{__file__}:{line} in forward: h = torch.relu(self.bn1(self.conv1(x)))"
    assert all("val" in n.meta and n.meta.get("stack_trace") for n in gm.graph.nodes
               if n.op in ("call_function", "call_module"))
    assert not any(n.op == "call_module" and n.target == "_guards_fn" for n in gm.graph.nodes)


def test_train_mode_batchnorm_and_instancenorm_update_stats_like_eager() -> None:
    model = _small_cnn()
    model.drop.p = model.drop2d.p = 0.0  # compare deterministic outputs
    eager = copy.deepcopy(model)
    gm = capture(model, (torch.randn(2, 3, 8, 8),))
    kinds = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    assert kinds == {"ModeBatchNorm", "ModeInstanceNorm", "ModeOp"}
    gm.train()
    eager.train()
    for _ in range(2):  # twice: momentum=None averages over num_batches_tracked
        x = torch.randn(4, 3, 8, 8)
        torch.testing.assert_close(gm(x), eager(x), atol=1e-5, rtol=0)
    for name, ref in eager.state_dict().items():
        torch.testing.assert_close(gm.state_dict()[name], ref, atol=1e-6, rtol=0, msg=name)
    assert int(gm.state_dict()["bn2.num_batches_tracked"]) == 5
    gm.eval()
    eager.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), eager(x), atol=1e-5, rtol=0)


def test_dropout_follows_mode() -> None:
    model = _small_cnn()
    gm = capture(model, (torch.randn(2, 3, 8, 8),))
    drops = [gm.get_submodule(n.target) for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ModeOp)]
    assert sorted(str(d.aten_op) for d in drops) == ["aten.dropout.default", "aten.feature_dropout.default"]
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        gm.eval()
        assert torch.equal(gm(x), gm(x))
        torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=0)
        gm.train()
        assert not torch.equal(gm(x), gm(x))


def test_resnet18_eval_and_train_parity() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _randomise_stats(torchvision.models.resnet18(num_classes=10))
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    gm = capture(model, (x,))
    assert set(gm.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), eager(x), atol=1e-5, rtol=0)
    gm.train()
    eager.train()
    xb = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(xb), eager(xb), atol=1e-5, rtol=0)
    for name, ref in eager.state_dict().items():
        torch.testing.assert_close(gm.state_dict()[name], ref, atol=1e-6, rtol=0, msg=name)
    assert int(gm.get_buffer("layer1.0.bn1.num_batches_tracked")) == 4


def test_training_flags_restored_and_inherited() -> None:
    model = _small_cnn().train()
    model.bn1.eval()  # a deliberately frozen BatchNorm
    gm = capture(model, (torch.randn(2, 3, 8, 8),))
    assert model.training and not model.bn1.training and model.bn2.training
    assert gm.training
    modes = {n.args[3].target: gm.get_submodule(n.target) for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ModeBatchNorm)}
    assert not modes["bn1.running_mean"].training and modes["bn2.running_mean"].training


@dataclasses.dataclass
class Pair:
    logits: torch.Tensor
    features: torch.Tensor


class Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, extra: dict) -> dict:
        y = self.fc(x + extra["shift"])
        return {"pair": Pair(y, x[:, 1:3]), "rest": (y.relu(), [x[0], None]), "n": 3}


def test_pytree_inputs_and_outputs_round_trip() -> None:
    model = Structured().eval()
    x, shift = torch.randn(2, 4), torch.randn(2, 4)
    gm = capture(model, (x,), {"extra": {"shift": shift}})
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 2  # x, then extra["shift"]
    out, ref = gm(x, extra={"shift": shift}), model(x, extra={"shift": shift})
    assert isinstance(out["pair"], Pair) and out["n"] == 3 and out["rest"][1][1] is None
    for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref), strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.slice.Tensor", "aten.select.int", "aten.linear.default"} <= ops


def test_hf_bert_model_output_round_trip() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    model = transformers.BertForSequenceClassification(config).eval()
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    gm = capture(model, (ids,), {"attention_mask": mask})
    assert set(model.state_dict()) <= set(gm.state_dict())
    with torch.no_grad():
        out, ref = gm(ids, attention_mask=mask), model(ids, attention_mask=mask)
        assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
        ids5 = torch.randint(0, 100, (5, 8))
        torch.testing.assert_close(gm(ids5, attention_mask=torch.ones(5, 8, dtype=torch.long)).logits,
                                   model(ids5, attention_mask=torch.ones(5, 8, dtype=torch.long)).logits,
                                   atol=1e-5, rtol=0)
    assert any("scaled_dot_product_attention" in str(n.target) for n in gm.graph.nodes)


def test_hf_causal_lm_with_cache_is_captured_without_config_change() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.config.use_cache
    ids = torch.randint(0, 100, (2, 8))
    gm = capture(model, (ids,))
    assert model.config.use_cache  # untouched
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["input_ids"]
    with torch.no_grad():
        out = gm(ids)
        torch.testing.assert_close(out.logits, model(ids, use_cache=False).logits, atol=1e-5, rtol=0)
    assert list(out.keys()) == ["logits"]


def test_dynamic_batch_runs_other_batch_sizes() -> None:
    model = _small_cnn()
    gm = capture(model, (torch.randn(2, 3, 8, 8),))
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert not is_concrete_int(placeholder.meta["val"].shape[0])
    assert node_shape(placeholder) == (2, 3, 8, 8)  # the symbolic batch reads as its example value
    with torch.no_grad():
        for batch in (5, 1):
            x = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)
    static = capture(model, (torch.randn(2, 3, 8, 8),), dynamic_batch=False)
    placeholder = next(n for n in static.graph.nodes if n.op == "placeholder")
    assert is_concrete_int(placeholder.meta["val"].shape[0]) and node_shape(placeholder) == (2, 3, 8, 8)


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).reshape(2, 2, 2).sum(1)


def test_specialised_batch_warns() -> None:
    with pytest.warns(CaptureWarning, match="specialised the batch"):
        gm = capture(FixedBatch().eval(), (torch.randn(2, 4),))
    assert gm(torch.randn(2, 4)).shape == (2, 2)


def test_dynamic_export_failure_falls_back_to_static(monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = torch.export.export

    def export(*args, **kwargs):  # a model whose batch dimension cannot be symbolic
        if kwargs.get("dynamic_shapes") is not None:
            raise RuntimeError("Constraints violated (batch)!\nmore detail")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", export)
    model = _small_cnn()
    with pytest.warns(CaptureWarning, match=r"dynamic batch dimension \(RuntimeError: Constraints violated"):
        gm = capture(model, (torch.randn(2, 3, 8, 8),))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_uncapturable_model_raises_trace_error_naming_the_line() -> None:
    line = next(i for i, text in enumerate(inspect.getsourcelines(DataDependent.forward)[0])
                if "x.sum() > 0" in text) + inspect.getsourcelines(DataDependent.forward)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureWarning)  # no static retry for a data-dependent failure
        with pytest.raises(TraceError) as info:
            capture(DataDependent(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "\n" not in message
    assert f"test_capture.py:{line} `if x.sum() > 0:`" in message
    assert "data-dependent" in message and "torch.where" in message


class _CachedBias(nn.Module):
    """Caches a tensor computed from a parameter in eval mode unless being traced (timm LeViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bias_table = nn.Parameter(torch.randn(4))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or self.training:
            bias = self.bias_table * 2
        else:
            bias = self.cache.setdefault("bias", self.bias_table.detach() * 2)
        return self.lin(x) + bias


class _UnexportableTracingPath(nn.Module):
    """Its is_tracing path branches on a tensor's value (not exportable); its eval path exports."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() and torch.tensor(x.shape[1]) * x.sum() > 0:
            return self.lin(x).relu()
        return self.lin(x)


def test_capture_takes_the_tracing_path_so_parameter_caches_stay_parameters() -> None:
    model = _CachedBias().eval()
    x = torch.randn(3, 4)
    model(x)  # fills the eval cache with this parameter's value
    gm = capture(model, (x,))
    with torch.no_grad():
        model.bias_table.add_(1.0)  # the graph reads the parameter, not the cached constant
    expected = model.lin(x) + model.bias_table * 2
    torch.testing.assert_close(gm(x), expected)


def test_capture_falls_back_to_the_eval_path_when_the_tracing_path_does_not_export() -> None:
    model = _UnexportableTracingPath().eval()
    x = torch.randn(3, 4)
    gm = capture(model, (x,))
    torch.testing.assert_close(gm(x), model.lin(x))  # the eval path: no relu
    assert not any(n.target is torch.ops.aten.relu.default for n in gm.graph.nodes)

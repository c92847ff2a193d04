"""Mode-switchable stand-ins for the ATen ops that take the training flag as a constant.

torch.export records ``aten.batch_norm``, ``aten.instance_norm``, the dropout family and
``aten.rrelu`` with the training flag of the (eval-mode) capture baked in, so a captured graph
would stay in eval mode forever. ``make_mode_switchable`` replaces each such node by a
``call_module`` to a stateless module here (``ModeBatchNorm``, ``ModeInstanceNorm``, ``ModeOp``),
called with the SAME positional arguments as the ATen op (its ``aten_op`` names it), that reads
its own ``self.training`` instead, so ``gm.train()`` / ``gm.eval()`` switch behaviour as they do
for the original model.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx
from torch import nn

_MODES_PREFIX = "_graphmerge_modes"


class ModeBatchNorm(nn.Module):
    """``aten.batch_norm`` with the training flag read from ``self.training``.

    Called with the op's own arguments ``(input, weight, bias, running_mean, running_var, training,
    momentum, eps, cudnn_enabled)`` and optionally ``num_batches_tracked=``; the captured
    ``training`` and ``momentum`` are ignored in favour of the mode and ``self.momentum`` (None:
    cumulative average, as ``nn.BatchNorm``). Without running statistics it always normalises with
    batch statistics, as ``nn.BatchNorm(track_running_stats=False)`` does.
    """

    aten_op = torch.ops.aten.batch_norm.default

    def __init__(self, momentum: float | None) -> None:
        super().__init__()
        self.momentum = momentum

    def forward(self, input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                momentum: float, eps: float, cudnn_enabled: bool,
                num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and running_mean is not None and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(num_batches_tracked)
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        return torch.batch_norm(input, weight, bias, running_mean, running_var, use_batch_stats, factor, eps,
                                cudnn_enabled)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


class ModeInstanceNorm(nn.Module):
    """``aten.instance_norm`` whose ``use_input_stats`` is ``self.training`` when running stats exist."""

    aten_op = torch.ops.aten.instance_norm.default

    def forward(self, input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, use_input_stats: bool,
                momentum: float, eps: float, cudnn_enabled: bool) -> torch.Tensor:
        use_input_stats = self.training or running_mean is None or running_var is None
        return torch.instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                                   cudnn_enabled)


# op name -> (index of the training flag, its keyword name)
_FLAG_OPS = {
    "aten::dropout": (2, "train"), "aten::dropout_": (2, "train"),
    "aten::feature_dropout": (2, "train"), "aten::feature_dropout_": (2, "train"),
    "aten::alpha_dropout": (2, "train"), "aten::alpha_dropout_": (2, "train"),
    "aten::feature_alpha_dropout": (2, "train"), "aten::feature_alpha_dropout_": (2, "train"),
    "aten::native_dropout": (2, "train"),
    "aten::rrelu": (3, "training"), "aten::rrelu_": (3, "training"),
}


class ModeOp(nn.Module):
    """An ATen op with a training flag (the dropout family, ``rrelu``), called with the op's own
    arguments, the flag replaced by ``self.training``."""

    def __init__(self, op: torch._ops.OpOverload) -> None:
        super().__init__()
        self.op_name = op.name()
        self.overload = op._overloadname
        self.flag_index, self.flag_name = _FLAG_OPS[self.op_name]

    @property
    def aten_op(self) -> torch._ops.OpOverload:
        packet = getattr(torch.ops.aten, self.op_name.split("::", 1)[1])
        return getattr(packet, self.overload)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.flag_name in kwargs or len(args) <= self.flag_index:
            kwargs[self.flag_name] = self.training
        else:
            args = args[:self.flag_index] + (self.training,) + args[self.flag_index + 1:]
        return self.aten_op(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.op_name}.{self.overload}"


def _op_name(target: Any) -> str:
    return target.name() if isinstance(target, torch._ops.OpOverload) else ""


def make_mode_switchable(gm: torch.fx.GraphModule, model: nn.Module, flags: dict[str, bool]) -> None:
    """Replace each mode-dependent ATen op by a ``call_module`` to a Mode* module (same arguments)."""
    graph = gm.graph
    modules = dict(model.named_modules(remove_duplicate=False))
    container = None
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        kwargs = dict(node.kwargs)
        owner_path = _owner_path(node)
        if name == "aten::batch_norm":
            stats_owner = _buffer_owner(node.args[3] if len(node.args) > 3 else None)
            bn = modules.get(stats_owner) if stats_owner is not None else None
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                module: nn.Module = ModeBatchNorm(bn.momentum)
                owner_path = stats_owner
                if bn.track_running_stats and getattr(bn, "num_batches_tracked", None) is not None:
                    kwargs["num_batches_tracked"] = _get_attr(graph, gm, f"{stats_owner}.num_batches_tracked",
                                                              before=node)
            else:
                module = ModeBatchNorm(node.args[6] if len(node.args) > 6 else 0.1)
        elif name == "aten::instance_norm":
            module = ModeInstanceNorm()
        elif name in _FLAG_OPS:
            module = ModeOp(node.target)
        else:
            continue
        if container is None:
            container = nn.Module()
            gm.add_module(_MODES_PREFIX, container)
        container.add_module(node.name, module)
        module.training = flags.get(owner_path or "", flags.get("", False))
        # rewrite the node in place: its name, meta, position and users stay
        node.op = "call_module"
        node.target = f"{_MODES_PREFIX}.{node.name}"
        node.kwargs = kwargs


def _owner_path(node: torch.fx.Node) -> str | None:
    """The qualified name of the innermost module whose forward created ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    fqn = list(stack.values())[-1][0]
    return re.sub(r"@\d+$", "", fqn)


def _buffer_owner(arg: Any) -> str | None:
    """The qualified name of the module owning the buffer a ``get_attr`` node reads."""
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        return arg.target.rpartition(".")[0]
    return None


def _get_attr(graph: torch.fx.Graph, gm: torch.fx.GraphModule, target: str, before: torch.fx.Node) -> torch.fx.Node:
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == target:
            return node
    with graph.inserting_before(before):
        node = graph.get_attr(target)
    node.meta["val"] = gm.get_buffer(target)
    return node


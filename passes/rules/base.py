"""What every op rule is built from: the rule types, the rule table and the helpers rules share.

``graphmerge.passes.registry`` is the public face (it imports every family, so every rule is
registered, and drives the analysis); the families in ``graphmerge.passes.rules`` import this module,
never the registry, so the imports among the passes form no cycle.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.fx
from graphmerge.passes import capture
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.ir import DimLayout, PinReason
from graphmerge.passes.labels import NOT_A_CHANNEL, TensorLabels
from graphmerge.passes.layout import LayoutError
from graphmerge.passes.propagation import Propagation
from graphmerge.passes.widen_context import WidenContext
from torch import nn

aten = torch.ops.aten
INT_MAX = 2**63 - 1
Registered = TypeVar("Registered")


# -- reading nodes -------------------------------------------------------------------------------

def node_shape(node: Any) -> tuple[int, ...] | None:
    if isinstance(node, ShapeOnly):
        return node.shape
    return capture.node_shape(node)


def node_shapes(node: torch.fx.Node) -> list[tuple[int, ...] | None]:
    """Shapes of a node that returns several values (split, max with indices); [] for one tensor."""
    return list(capture.node_shapes(node)) if isinstance(node.meta.get("val"), (list, tuple)) else []


def target_op(prop: Propagation | None, node: torch.fx.Node, gm: nn.Module | None = None) -> Any:
    """The ATen op a node runs: its target, or the ``aten_op`` of a capture-made mode module."""
    if node.op == "call_module":
        root = gm if gm is not None else prop.gm
        module = root.get_submodule(str(node.target))
        return getattr(module, "aten_op", None)
    return node.target


def op_args(node: torch.fx.Node, op: Any = None) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (``input``, ``weight``, ``dim``...)."""
    op = op if op is not None else node.target
    schema = getattr(op, "_schema", None)
    if schema is None:
        return {str(i): a for i, a in enumerate(node.args)} | dict(node.kwargs)
    out: dict[str, Any] = {}
    for i, argument in enumerate(schema.arguments):
        if i < len(node.args):
            out[argument.name] = node.args[i]
        elif argument.name in node.kwargs:
            out[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            out[argument.name] = argument.default_value
        else:
            out[argument.name] = None
    for key, value in node.kwargs.items():
        out.setdefault(key, value)
    return out


def set_arg(node: torch.fx.Node, name: str, value: Any, op: Any = None) -> None:
    """Replace argument ``name`` of ``node`` (positional or keyword)."""
    op = op if op is not None else node.target
    names = [a.name for a in op._schema.arguments]
    index = names.index(name)
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def describe(node: torch.fx.Node) -> str:
    """The op a node runs, its name and the user's source line, for error messages and pin reasons."""
    target = node.target
    if node.op == "call_module":
        what = f"module '{target}'"
    elif isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        what = str(target)
    elif callable(target):
        what = f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', str(target))}".lstrip(".")
    else:
        what = str(target)
    where = capture.source_line(node) if node.meta.get("stack_trace") else None
    return f"{what} (node {node.name})" + (f" at {where}" if where else "")


def labels_of(prop: Propagation, value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return prop.labels.get(value)
    if isinstance(value, (list, tuple)):
        return type(value)(labels_of(prop, v) for v in value)
    if isinstance(value, dict):
        return {k: labels_of(prop, v) for k, v in value.items()}
    return None


def flatten(value: Any):
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from flatten(item)
    else:
        yield value


def tensor_args(prop: Propagation, node: torch.fx.Node) -> list[TensorLabels]:
    found = []
    for value in (*node.args, *node.kwargs.values()):
        found.extend(x for x in flatten(labels_of(prop, value)) if isinstance(x, TensorLabels))
    return found


def unlabelled(node: torch.fx.Node) -> Any:
    shape = node_shape(node)
    if shape is not None:
        return TensorLabels.unlabelled(shape)
    shapes = node_shapes(node)
    if shapes:
        return tuple(None if s is None else TensorLabels.unlabelled(s) for s in shapes)
    return None


def channels(prop: Propagation, ids: np.ndarray | None, size: int, message: str, *,
             reason: PinReason = PinReason.NOT_A_CHANNEL) -> np.ndarray:
    """Ids that must be channels (a conv's input); non-channel positions become pinned ids."""
    if ids is None:
        ids = np.full(size, NOT_A_CHANNEL, np.int64)
    missing = ids < 0
    if missing.any():
        ids = ids.copy()
        fresh = prop.fresh(int(missing.sum()))
        prop.mark_not_channel(fresh, message, reason=reason)
        ids[missing] = fresh
    return ids


def param_name(value: Any) -> str | None:
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return str(value.target)
    return None


def pin_mixing(prop: Propagation, ids: np.ndarray, message: str, *, reason: PinReason = PinReason.MIXING) -> None:
    """Pin ids an op sums or indexes over. Positions of a graph input (token positions that a
    positional table or the input itself labels) are shared by every teacher: not an inner pin."""
    if prop.from_input(ids):
        prop.pin(ids, f"graph input positions: {message}", reason=PinReason.INPUT_POSITIONS)
    else:
        prop.pin(ids, message, reason=reason)


def pin_all(prop: Propagation, node: torch.fx.Node, message: str, *,
            reason: PinReason = PinReason.OP_RULE) -> Any:
    """Pin everything the op touches (its tensor inputs, parameters among them); unlabelled output."""
    for labels in tensor_args(prop, node):
        prop.pin(labels.all_ids(), message, reason=reason)
    return unlabelled(node)


class ShapeOnly:
    """A stand-in node carrying only an output shape, for rules applied to part of an op."""

    def __init__(self, node: torch.fx.Node, shape: tuple[int, ...]):
        self.name = node.name
        self.op = node.op
        self.target = node.target
        self.shape = tuple(shape)
        self.meta = {"stack_trace": node.meta.get("stack_trace")}


def raise_layout(node: torch.fx.Node, why: str) -> None:
    raise LayoutError(f"{describe(node)}: {why}")


# -- the rule type -------------------------------------------------------------------------------

@dataclass
class SizeContext:
    """What a rewrite needs: the layouts of the node and its input, and the new-size functions.

    ``size(dim_layout)`` is the new size of a labelled dim; ``prefix(dim_layout, stop)`` the new
    size of its first ``stop`` positions (for slice bounds and split sizes).
    """

    node_dims: list[DimLayout | None] | None
    input_dims: list[DimLayout | None] | None
    size: Callable[[DimLayout], int]
    widened: Callable[[DimLayout], bool]

    def prefix(self, dim: DimLayout, stop: int) -> int:
        if not stop:
            return 0
        start = None if dim.start is None else dim.start[:stop]
        return self.size(DimLayout(dim.group[:stop], dim.channel[:stop], start))


class OpRule:
    """All the passes know about one op. Subclass and override; the defaults pin and rewrite nothing."""

    linear: bool = False

    def couple(self, prop: Propagation, node: torch.fx.Node) -> Any:
        return pin_all(prop, node, f"{describe(node)}: its rule does not say how channels flow")

    def rewrite(self, node: torch.fx.Node, sizes: SizeContext) -> None:
        """Rewrite literal arguments for the new channel widths (widen, compress to a ratio)."""

    def is_linear(self, prop: Propagation, node: torch.fx.Node) -> bool:
        """Whether this call commutes with averaging the teachers (``linear``, by default)."""
        return self.linear

    def plan_widen(self, node: torch.fx.Node, ctx: WidenContext) -> None:
        """Before widen builds the big student's tensors: claim the parameters this call needs stacked
        per teacher (``ctx.stack``). ``node`` is still the analysed node."""

    def widen(self, node: torch.fx.Node, ctx: WidenContext) -> None:
        """Rewrite this call in the big student where running it unchanged on the widened tensors would
        not compute the teachers' mean (block-wise per teacher, per-teacher parameters, tied weights)."""


class FunctionRule(OpRule):
    """A rule from plain functions: ``couple(prop, node)`` and optionally ``rewrite(node, sizes)``."""

    def __init__(self, couple: Callable[[Propagation, torch.fx.Node], Any],
                 rewrite: Callable[[torch.fx.Node, SizeContext], None] | None = None, *, linear: bool = False):
        self._couple = couple
        self._rewrite = rewrite
        self.linear = linear

    def couple(self, prop: Propagation, node: torch.fx.Node) -> Any:
        return self._couple(prop, node)

    def rewrite(self, node: torch.fx.Node, sizes: SizeContext) -> None:
        if self._rewrite is not None:
            self._rewrite(node, sizes)

    def __repr__(self) -> str:
        return f"FunctionRule({getattr(self._couple, '__name__', self._couple)})"


class RegistrationError(GraphMergeError):
    """A mistake in the built-in rule table (an op that is not ATen, or one registered twice)."""


RULES: dict[Any, OpRule] = {}


def register_rule(op: Any, rule: OpRule | Callable[[Propagation, torch.fx.Node], Any], *,
                  linear: bool = False) -> None:
    """Teach graphmerge an op: ``rule`` is an ``OpRule``, or a ``couple`` function (wrapped).

    A user's rule replaces any rule the op had; ``register`` is the strict form."""
    if not isinstance(rule, OpRule):
        rule = FunctionRule(rule, linear=linear)
    RULES[op] = rule


def rule_for(op: Any) -> OpRule | None:
    if op is None:
        return None
    rule = RULES.get(op)
    if rule is None and isinstance(op, torch._ops.OpOverload):
        rule = RULES.get(op.overloadpacket)
    return rule


def rule_of_node(node: torch.fx.Node, gm: nn.Module) -> OpRule | None:
    """The rule of the op a call node of ``gm`` runs, else None (placeholders, get_attr, plain functions)."""
    return rule_for(target_op(None, node, gm)) if node.op in ("call_function", "call_module") else None


def aten_op(name: str) -> Any:
    """The ATen op packet ``name``; a name that is none is a mistake in a rule table, not a skip
    (``tanhshrink``, ``softsign`` and ``lp_pool2d`` are not ATen ops: torch.export decomposes them)."""
    op = getattr(aten, name, None)
    if op is None:
        raise RegistrationError(f"a rule is registered for {name!r}, which is not an ATen op in torch "
                                f"{torch.__version__}; remove the name from its @register in passes/rules/.")
    return op


def _resolve(ops: Iterable[Any], inplace: bool) -> list[Any]:
    """Op objects for names and ops; ``inplace`` adds each name's ``name_`` variant where ATen has one."""
    resolved: list[Any] = []
    for op in ops:
        if isinstance(op, str):
            variants = [aten_op(op)] + ([getattr(aten, op + "_")] if inplace and hasattr(aten, op + "_") else [])
        elif isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            variants = [op]
        else:
            raise RegistrationError(f"a rule is registered for {op!r}, which is not an ATen op (an OpOverload or "
                                    "OpOverloadPacket such as torch.ops.aten.relu or torch.ops.mylib.myop).")
        resolved.extend(v for v in variants if v not in resolved)
    return resolved


def register(*ops: Any, rewrite: Callable[[torch.fx.Node, SizeContext], None] | None = None,
             linear: bool = False, inplace: bool = False,
             rule_type: type[FunctionRule] | None = None) -> Callable[[Registered], Registered]:
    """Register the decorated rule for ``ops``: ATen names (``"relu"``) or op objects
    (``torch.ops.aten.relu``, ``torch.ops.mylib.myop``).

    The decorated object is an ``OpRule`` subclass (instantiated without arguments), an ``OpRule``, or a
    ``couple(prop, node)`` function (a ``FunctionRule``, or ``rule_type``, a subclass of it holding the op's
    widen hooks, with ``rewrite`` and ``linear``); it is returned
    unchanged, so several ``@register`` lines can stack. ``inplace`` also registers each name's in-place
    variant (``relu_``). Strict: a name that is not an ATen op, or an op that already has a rule, raises
    ``RegistrationError`` (the later rule would silently win).
    """
    resolved = _resolve(ops, inplace)

    def decorate(target: Registered) -> Registered:
        if isinstance(target, type) and issubclass(target, OpRule):
            rule = target()
        elif isinstance(target, OpRule):
            rule = target
        else:
            rule = (rule_type or FunctionRule)(target, rewrite, linear=linear)
        for op in resolved:
            if op in RULES:
                raise RegistrationError(f"a rule table registers {op} twice ({RULES[op]!r}, then {rule!r}); "
                                        "keep one (passes/rules/).")
        RULES.update(dict.fromkeys(resolved, rule))
        return target

    return decorate


def on_input(body: Callable[..., Any] | None = None, *, needs_shape: bool = True) -> Any:
    """The shared preamble of a rule for an op on one tensor (its argument 0): the couple function
    ``body(prop, node, x, shape, args)`` runs with ``x`` the input's labels, ``shape`` the output's
    shape and ``args`` the arguments by name; an unlabelled input (or, with ``needs_shape``, an output
    that is not one tensor) gives an unlabelled result without calling it."""

    def wrap(body: Callable[..., Any]) -> Callable[[Propagation, torch.fx.Node], Any]:
        @functools.wraps(body)
        def couple(prop: Propagation, node: torch.fx.Node) -> Any:
            x = labels_of(prop, node.args[0])
            shape = node_shape(node)
            if not isinstance(x, TensorLabels) or (needs_shape and shape is None):
                return unlabelled(node)
            return body(prop, node, x, shape, op_args(node))

        return couple

    return wrap(body) if body is not None else wrap


# -- parameters and constants --------------------------------------------------------------------

def non_persistent_buffer(prop: Propagation, name: str) -> torch.Tensor | None:
    """The non-persistent buffer called ``name`` (built by the model's class, not loaded), else None."""
    owner, _, attr = name.rpartition(".")
    try:
        module = prop.gm.get_submodule(owner) if owner else prop.gm
    except AttributeError:
        return None
    if attr not in getattr(module, "_non_persistent_buffers_set", set()):
        return None
    return module._buffers.get(attr)


def constant_buffer(prop: Propagation, value: Any) -> str | None:
    """The name of a non-persistent floating buffer read by ``value`` (a table the model builds at
    init, the same in every teacher: ALiBi's per-head slopes, a per-channel constant), else None."""
    name = param_name(value)
    if name is None or name in prop.params:
        return None
    tensor = non_persistent_buffer(prop, name)
    return name if tensor is not None and tensor.is_floating_point() else None


def tie_param(prop: Propagation, node: torch.fx.Node, value: Any, dims: list[np.ndarray | None], *,
              out_dim: int | None = None, in_dims: tuple[int, ...] = ()) -> bool:
    """The parameter read by ``value`` (a get_attr node) has these channel ids per dim.

    Returns False when ``value`` is not a parameter (a computed tensor): the caller decides.
    """
    name = param_name(value)
    if name is None:
        labels = labels_of(prop, value)
        if isinstance(labels, TensorLabels):
            for have, want in zip(labels.dims(), dims, strict=False):
                if have is not None and want is not None and len(have) == len(want):
                    prop.unify(have, want, describe(node))
        return False
    seen = prop.params.get(name)
    if seen is not None:
        # dims the op says carry no channel (kernel taps, an embedding's rows): the ids get_attr
        # gave them are not channels of anything, so they make no group
        dims = list(dims)
        for d, want in enumerate(dims):
            have = seen.dims[d] if d < len(seen.dims) else None
            fresh = prop.fresh_param_dims.get(name)
            untouched = fresh is not None and d < len(fresh) and have is fresh[d]
            if want is not None and have is not None and not (want >= 0).any() and untouched and (have >= 0).all():
                prop.discard(have)
                seen.dims[d] = np.asarray(want, np.int64)
                dims[d] = None
            elif want is not None and have is not None and have.shape == want.shape and (have < 0).all() \
                    and (want >= 0).all():
                seen.dims[d] = np.asarray(want, np.int64)  # a size-1 dim get_attr left unlabelled
                dims[d] = None
        dims = [seen.dims[d] if w is None else w for d, w in enumerate(dims)]
    prop.use_param(name, dims, out_dim=out_dim, in_dims=in_dims)
    use = prop.params[name]
    if use.out_dim is None:
        use.out_dim = out_dim
    if not use.in_dims:
        use.in_dims = in_dims
    return True


SLICING = ("chunk", "split", "split_with_sizes", "slice", "narrow", "select", "unbind")


def param_root(value: Any) -> str | None:
    """The parameter a value is cut from (get_attr, or getitem/chunk/slice of one), else None."""
    while isinstance(value, torch.fx.Node):
        if value.op == "get_attr":
            return str(value.target)
        if value.target is operator.getitem or getattr(getattr(value.target, "overloadpacket", None),
                                                       "__name__", "") in SLICING:
            value = value.args[0]
            continue
        return None
    return None

"""Stream: run a graph node by node in another dtype without copying the model.

The certificates compare a compiled model with what it must compute, in float64. Copying whole
models to float64 costs twice to four times their size, several times over (the teachers, the
big student, the student), so a graph is run here piece by piece instead:

- a parameter or buffer is read where a node uses it and cast to the run's dtype for that node
  only (``get_attr`` nodes are not evaluated at their place in the graph: the capture puts them
  all first);
- an activation is dropped as soon as the last node that reads it has run;
- a node whose op writes into a tensor argument gets its own copy of a parameter, so nothing the
  caller holds is ever changed;
- a dtype the capture recorded as a literal (``aten.to(x, torch.float32)`` where the model wrote
  ``x.to(weight.dtype)``) follows the run's dtype, as the model meant;
- capture-made modules (``ModeBatchNorm``, gates) run in eval mode, their flags restored after.

The working set is therefore one node's parameters in the run's dtype plus the activations still
to be read, which :class:`Meter` measures. ``run_values`` yields every computed node with its
value, so two graphs can be walked in lockstep (``first_divergence``) without recording either.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from graphmerge.passes.util import getattr_path
from torch import nn
from torch.utils import _pytree as pytree

Fetch = Callable[[str], Any]


class NodeFailed(Exception):
    """A node's op raised while the graph ran; ``node`` is that node, ``error`` what it raised."""

    def __init__(self, node: torch.fx.Node, error: BaseException):
        super().__init__(f"{node.name}: {error}")
        self.node = node
        self.error = error


@dataclass
class Meter:
    """The bytes of the tensors a run holds at once (its casts and activations), and their peak.

    Storage is counted once however many views share it; tensors the caller owns (parameters
    read without a cast, the inputs) are not counted.
    """

    live: int = 0
    peak: int = 0
    owners: dict[int, list[int]] = field(default_factory=dict)  # storage ptr -> [references, bytes]
    external: set[int] = field(default_factory=set)

    def hold(self, value: Any) -> None:
        for tensor in _tensors(value):
            ptr, size = _storage(tensor)
            if ptr in self.external or size == 0:
                continue
            entry = self.owners.get(ptr)
            if entry is None:
                self.owners[ptr] = [1, size]
                self.live += size
            else:
                entry[0] += 1
        self.peak = max(self.peak, self.live)

    def release(self, value: Any) -> None:
        for tensor in _tensors(value):
            ptr, _ = _storage(tensor)
            entry = self.owners.get(ptr)
            if entry is None:
                continue
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.owners[ptr]

    def transient(self, size: int) -> None:
        """Count ``size`` bytes on top of what is live now, for the moment (a node's casts)."""
        self.peak = max(self.peak, self.live + size)

    def own(self, value: Any) -> None:
        for tensor in _tensors(value):
            self.external.add(_storage(tensor)[0])


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple, dict)):
        return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
    return []


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
        return id(tensor), tensor.numel() * tensor.element_size()


@dataclass
class Streamed:
    """A graph to run and where its state comes from.

    ``fetch(name)`` gives the tensor a ``get_attr`` of ``name`` reads (default: the graph module's
    own attribute); ``modules`` replaces the submodules of ``call_module`` nodes by name.
    ``source_dtype`` is the floating dtype the graph's tensors have, whose literals follow the run.
    """

    graph_module: torch.fx.GraphModule
    fetch: Fetch | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)
    source_dtype: torch.dtype | None = None

    def tensor(self, name: str) -> Any:
        if self.fetch is not None:
            return self.fetch(name)
        return getattr_path(self.graph_module, name)

    def module(self, name: str) -> nn.Module:
        return self.modules.get(name) or self.graph_module.get_submodule(name)


def flat_inputs(args: Sequence[Any], kwargs: dict[str, Any] | None) -> list[Any]:
    """The graph's placeholders' values: the flat leaves of ``(args, kwargs)`` (see ``capture``)."""
    return pytree.tree_leaves((tuple(args), dict(kwargs or {})))


def run_outputs(streamed: Streamed, inputs: Sequence[Any], dtype: torch.dtype, meter: Meter | None = None) -> list[Any]:
    """The flat output leaves of the graph run on ``inputs`` (see ``flat_inputs``) in ``dtype``."""
    output: list[Any] = []
    for node, value in run_values(streamed, inputs, dtype, meter):
        if node.op == "output":
            output = value
    return output


def run_values(streamed: Streamed, inputs: Sequence[Any], dtype: torch.dtype,
               meter: Meter | None = None) -> Iterator[tuple[torch.fx.Node, Any]]:
    """Run the graph node by node in ``dtype``; yield each computed node and its value, the output
    node last with the flat list of output leaves. A node whose op raises becomes ``NodeFailed``."""
    meter = meter if meter is not None else Meter()
    graph = streamed.graph_module.graph
    nodes = list(graph.nodes)
    last_use = _last_uses(nodes)
    held_params = _mutated_params(nodes)
    placeholders = [node for node in nodes if node.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise ValueError(f"the graph takes {len(placeholders)} inputs, {len(inputs)} given")
    source = streamed.source_dtype
    pool = _CastPool(dtype, meter, _largest_read(streamed, nodes))
    env: dict[torch.fx.Node, Any] = {}
    feed = iter(inputs)
    try:
        for index, node in enumerate(nodes):
            if node.op == "placeholder":
                given = next(feed)
                value = _cast(given, dtype)
                (meter.own if value is given else meter.hold)(value)
                env[node] = value
            elif node.op == "get_attr":
                if node in held_params:  # an op writes into it: one copy for the whole run
                    value = _cast(streamed.tensor(str(node.target)), dtype, copy_always=True)
                    meter.hold(value)
                    env[node] = value
                continue  # otherwise read where it is used
            elif node.op == "output":
                result = _resolve(node.args[0], env, streamed, pool)
                pool.settle(result)
                yield node, [x for x in pytree.tree_leaves(result)]
                return
            else:
                casts: dict[str, Any] = {}
                args = _resolve(node.args, env, streamed, pool, casts)
                kwargs = _resolve(node.kwargs, env, streamed, pool, casts)
                if source is not None and source != dtype:
                    args, kwargs = _retarget((args, kwargs), source, dtype)
                try:
                    value = _call(streamed, node, args, kwargs)
                except Exception as error:  # noqa: BLE001 - the caller names the node and the op's error
                    raise NodeFailed(node, error) from error
                del casts, args, kwargs
                pool.settle(value)
                meter.hold(value)
                env[node] = value
                yield node, value
                if not node.users:
                    meter.release(env.pop(node))
            for done in last_use.get(index, ()):
                if done in env:
                    meter.release(env.pop(done))
    finally:
        pool.close()


class _CastPool:
    """Where a node's parameters are cast to the run's dtype.

    A large parameter is cast into a buffer an earlier node's parameter used: fresh memory costs
    a page fault per page, several times the copy itself. A buffer that a node's result still
    views (a transpose of the weight) goes with that result and is never reused.
    """

    SMALL = 1 << 20  # bytes; smaller casts come from the allocator as usual

    def __init__(self, dtype: torch.dtype, meter: Meter, largest: int):
        self.dtype = dtype
        self.meter = meter
        self.largest = largest  # elements of the largest tensor the graph reads: every buffer's size
        self.free: list[torch.Tensor] = []
        self.lent: list[torch.Tensor] = []

    def cast(self, tensor: Any) -> Any:
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dtype != self.dtype):
            return _cast(tensor, self.dtype)
        size = tensor.numel()
        if size * torch.empty((), dtype=self.dtype).element_size() < self.SMALL:
            cast = tensor.detach().to(self.dtype)
            self.meter.transient(_storage(cast)[1])
            return cast
        fitting = [b for b in self.free if b.numel() >= size]
        if fitting:
            buffer = min(fitting, key=torch.Tensor.numel)
            self.free.remove(buffer)
        else:  # the first buffer has the largest size, so buffers of growing sizes do not fragment the heap
            first = not self.free and not self.lent
            buffer = torch.empty(max(size, self.largest) if first else size, dtype=self.dtype)
            self.meter.live += _storage(buffer)[1]
            self.meter.transient(0)
        self.lent.append(buffer)
        return buffer[:size].view(tensor.shape).copy_(tensor.detach())

    def settle(self, value: Any) -> None:
        """After a node ran: buffers its result views leave the pool with it, the others return."""
        if not self.lent:
            return
        viewed = {_storage(t)[0] for t in _tensors(value)}
        for buffer in self.lent:
            if _storage(buffer)[0] in viewed:
                self.meter.live -= _storage(buffer)[1]  # counted from now on as the result's
            else:
                self.free.append(buffer)
        self.lent.clear()

    def _drop(self, buffer: torch.Tensor) -> None:
        self.free.remove(buffer)
        self.meter.live -= _storage(buffer)[1]

    def close(self) -> None:
        for buffer in [*self.free]:
            self._drop(buffer)
        for buffer in self.lent:
            self.meter.live -= _storage(buffer)[1]
        self.lent.clear()


def _call(streamed: Streamed, node: torch.fx.Node, args: Any, kwargs: Any) -> Any:
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_, *rest = args
        return getattr(self_, node.target)(*rest, **kwargs)
    module = cast_module(streamed.module(str(node.target)), args[0].dtype if args and _is_float(args[0]) else None)
    flags = [(m, m.training) for m in module.modules()]
    for m, _ in flags:
        m.training = False
    try:
        return module(*args, **kwargs)
    finally:
        for m, flag in flags:
            m.training = flag


def _largest_read(streamed: Streamed, nodes: list[torch.fx.Node]) -> int:
    """The most elements of one floating tensor a ``get_attr`` of the graph reads."""
    largest = 0
    for name in {str(node.target) for node in nodes if node.op == "get_attr" and node.users}:
        tensor = streamed.tensor(name)
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            largest = max(largest, tensor.numel())
    return largest


def _resolve(value: Any, env: dict[torch.fx.Node, Any], streamed: Streamed, pool: _CastPool,
             casts: dict[str, Any] | None = None) -> Any:
    casts = {} if casts is None else casts

    def lookup(node: torch.fx.Node) -> Any:
        if node in env:
            return env[node]
        if node.op == "get_attr":
            name = str(node.target)
            if name not in casts:
                tensor = streamed.tensor(name)
                # a submodule read by a higher-order op: a copy in the run's dtype
                cast = cast_module(tensor, pool.dtype) if isinstance(tensor, nn.Module) else pool.cast(tensor)
                if cast is tensor or (isinstance(cast, torch.Tensor) and cast.data_ptr() == tensor.data_ptr()):
                    pool.meter.own(cast)
                casts[name] = cast
            return casts[name]
        raise KeyError(f"{node.name} was dropped before its last use")  # a bug in _last_uses

    return torch.fx.node.map_arg(value, lookup)


def _cast(value: Any, dtype: torch.dtype, *, copy_always: bool = False) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.detach().to(dtype)
    if isinstance(value, torch.Tensor) and copy_always:
        return value.detach().clone()
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return value.detach()
    return value


def _retarget(value: Any, old: torch.dtype, new: torch.dtype) -> Any:
    """``old`` replaced by ``new`` among the literal arguments (see ``certify.retarget_dtype_literals``)."""
    leaves, spec = pytree.tree_flatten(value)
    if not any(leaf is old for leaf in leaves):
        return value
    return pytree.tree_unflatten([new if leaf is old else leaf for leaf in leaves], spec)


def _last_uses(nodes: list[torch.fx.Node]) -> dict[int, list[torch.fx.Node]]:
    """Position of each node's last reader -> the nodes whose values can go after it ran."""
    position = {node: i for i, node in enumerate(nodes)}
    done: dict[int, list[torch.fx.Node]] = {}
    for node in nodes:
        if node.op in ("get_attr", "output") or not node.users:
            continue
        last = max(position[user] for user in node.users)
        done.setdefault(last, []).append(node)
    for node in nodes:  # a parameter held for the whole run (written into) goes after its last reader
        if node.op == "get_attr" and node.users:
            done.setdefault(max(position[user] for user in node.users), []).append(node)
    return done


def _mutated_params(nodes: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """``get_attr`` nodes that some op writes into (an in-place op, ``copy_``, ``index_put_``)."""
    held = set()
    for node in nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None or not schema.is_mutable:
            continue
        written = {arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write}
        bound = dict(zip([a.name for a in schema.arguments], node.args, strict=False)) | dict(node.kwargs)
        for name in written:
            target = bound.get(name)
            if isinstance(target, torch.fx.Node) and target.op == "get_attr":
                held.add(target)
    return held


# -- two graphs in lockstep ----------------------------------------------------------------------


Expectation = Callable[[str, torch.Tensor, list[torch.Tensor]], list[tuple[Any, torch.Tensor]]]


def first_divergence(big: Streamed, teachers: Sequence[Streamed], inputs: Sequence[Any], dtype: torch.dtype,
                     tolerance: float, expected_of: Expectation, describe: Callable[[torch.fx.Node], str]) -> str:
    """Run the big student and the teachers' graphs side by side; name the first node that differs.

    ``expected_of(name, big_value, teacher_values)`` says how a node of the big student relates to
    the node of that name in the teachers' graphs: (index into the big value, expected tensor)
    pairs, empty where the node cannot be compared. Each teacher's graph advances only as far as
    the big student's node being compared, so neither graph's values are recorded.
    """
    teacher_names = {node.name for node in teachers[0].graph_module.graph.nodes}
    shared = {node.name for node in big.graph_module.graph.nodes} & teacher_names
    walkers = [_Walker(run_values(t, inputs, dtype), shared) for t in teachers]
    with torch.no_grad():
        for node, value in run_values(big, inputs, dtype):
            if node.op == "output" or node.name not in shared or not _is_float(value):
                continue
            own = [walker.value_of(node.name) for walker in walkers]
            if not all(_is_float(v) for v in own):
                continue
            found = _compare_node(node, value, own, tolerance, expected_of, describe)
            if found:
                return found
    return "No single node of the big student differs from the teachers' values; the outputs are assembled wrongly. "


def _compare_node(node: torch.fx.Node, value: torch.Tensor, own: list[torch.Tensor], tolerance: float,
                  expected_of: Expectation, describe: Callable[[torch.fx.Node], str]) -> str | None:
    for index, expected in expected_of(node.name, value, own):
        try:
            got = value[index] if index is not None else value
        except IndexError:
            return (f"The first node whose value differs is {describe(node)}: its shape {tuple(value.shape)} "
                    "does not fit the teachers' channels laid side by side. ")
        if got.shape != expected.shape:
            return (f"The first node whose value differs is {describe(node)}: shape {tuple(got.shape)} where "
                    f"the teachers' values give {tuple(expected.shape)}. ")
        scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
        error = float((got - expected).abs().max()) if expected.numel() else 0.0
        if error > tolerance * scale:
            return (f"The first node whose value differs is {describe(node)}: off by {error:.3g} (scale "
                    f"{scale:.3g}). ")
    return None


class _Walker:
    """A teacher's run, advanced on demand to the node asked for. Values of nodes the big student
    also has are kept until asked for (the big student runs the same nodes in the same order, so
    normally none wait); all others are dropped as the run passes them."""

    def __init__(self, values: Iterator[tuple[torch.fx.Node, Any]], wanted: set[str]):
        self.values = values
        self.wanted = wanted
        self.waiting: dict[str, Any] = {}

    def value_of(self, name: str) -> Any:
        if name in self.waiting:
            return self.waiting.pop(name)
        for node, value in self.values:
            if node.name == name:
                return value
            if node.name in self.wanted and _is_float(value):
                self.waiting[node.name] = value
        return None


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def give_back_freed_memory() -> None:
    """Return the memory a run freed to the operating system (glibc's ``malloc_trim``; elsewhere
    nothing). A run frees float64 parameters and activations of every size; glibc keeps much of
    that in its heaps, where it would count in the process's memory through every later stage."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError, TypeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def cast_module(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A small module (a gate vector, a block norm's index buffers) in ``dtype``: itself if it has
    nothing floating of another dtype, else a copy."""
    if dtype is None:
        return module
    floats = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point() and t.dtype != dtype]
    return copy.deepcopy(module).to(dtype) if floats else module


__all__ = ["Meter", "NodeFailed", "Streamed", "first_divergence", "flat_inputs", "give_back_freed_memory",
           "run_outputs", "run_values"]

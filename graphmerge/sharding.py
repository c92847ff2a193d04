"""Fully sharded training (FSDP2) of the gated big student and the student, and sharded checkpoints.

``merge(..., strategy="fsdp")`` under torchrun (``graphmerge merge ... --shard``) trains the gate
phase's gated big student and the fine-tuned student with ``torch.distributed.fsdp.fully_shard``:
each rank holds 1/K of every sharded parameter, of its gradient and of its optimiser state, and
gathers a unit's full parameters only while that unit runs. What is sharded, generically:

- **Units.** The repeated submodules (children named ``0, 1, ...`` of one container: a ModuleList,
  a Sequential, the blocks of a captured model) each form one unit, and so does every other child,
  along the path from the model down to those containers, that holds parameters (an embedding, a
  final norm, a head). Without repeated submodules the model's top-level children are the units.
  The parameters left over (a positional table on the model itself) form the root unit.
- **Replicated parameters** (the gates' log-alphas) are left out of every unit (``ignored_params``):
  each rank holds them whole, their gradients are averaged over the ranks by an all-reduce as each
  is accumulated, and the gate optimiser steps them identically on every rank, so the budget
  projection and the decision see the same values everywhere.
- **Captured graphs.** The big student is a ``torch.fx.GraphModule``: its forward reads parameters
  with ``get_attr`` and never calls the submodules, so FSDP's per-module hooks would not run. The
  nodes that read a unit's parameters are a contiguous stretch of the graph; that stretch is
  outlined into the unit's own ``forward`` (``_outline``), and the graph calls the unit instead. A
  unit whose stretch overlaps another's (a weight tied across the model) is not outlined; its
  parameters stay in the root unit.
- **Checked.** Before sharding, one forward on the example inputs records which unit's parameters
  each op reads (a ``TorchFunctionMode``); a unit whose forward did not run, or whose parameters are
  read outside its forward (a tied weight), is merged into the root unit instead of failing later
  with a DTensor error.

Training runs on a copy of the model that shares its buffers and replicated parameters; the
sharded parameters' full tensors are released from the original while the copy trains and written
back by :meth:`ShardedModel.finish` (gathered on every rank), so the rest of the recipe (compress,
evaluation, the returned student) sees a plain module.

Checkpoints (:func:`save_sharded` / :func:`load_sharded`): every rank writes its own shards of the
parameters and optimiser state with ``torch.distributed.checkpoint`` into one folder of
safetensors files (``HuggingFaceStorageWriter``, no pickle); the non-tensor optimiser state
(hyper-parameters) travels in the recipe's main checkpoint file. Loading reads each rank's shards
back into the sharded model, so a resumed run continues bitwise like an uninterrupted one.
"""

from __future__ import annotations

import copy
import itertools
import shutil
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from graphmerge.errors import GraphMergeError
from graphmerge.passes.util import eval_mode
from graphmerge.training import DistContext

__all__ = ["STRATEGIES", "ShardedModel", "check_strategy", "checkpoint_entries", "is_sharded", "load_sharded",
           "memory_report", "parameter_bytes", "prune_sharded", "restore_entries", "save_sharded", "shard",
           "shard_units"]

STRATEGIES = ("ddp", "fsdp")
SHARDED_FOLDER = "sharded"  # inside the checkpoint folder: one subfolder of shards per saved epoch


def check_strategy(strategy: str, world_size: int | None = None) -> None:
    """A known strategy; "fsdp" only in a torchrun job of two or more processes (``world_size``;
    None: the name only)."""
    if strategy not in STRATEGIES:
        raise GraphMergeError(f"unknown strategy {strategy!r}: use 'ddp' (every rank holds the whole model; a single "
                              f"process without torchrun) or 'fsdp' (parameters, gradients and optimiser state "
                              f"sharded over the torchrun processes).")
    if strategy == "fsdp" and world_size is not None and world_size < 2:
        raise GraphMergeError(
            "sharding (strategy='fsdp', --shard) splits the big student and the student over the processes of a "
            "torchrun job, but this is a single process (WORLD_SIZE is unset or 1), so there is nothing to shard "
            "over. Launch it with torchrun, e.g. `torchrun --nproc_per_node=2 -m graphmerge.cli merge ... --shard`, "
            "or drop --shard (strategy='ddp') to train the whole model in this process.")


# --- which submodules become units ----------------------------------------------------------

def _body(model: nn.Module, replicated: set[int]) -> tuple[str, nn.Module]:
    """The module whose children are the units' candidates: down through wrappers that hold no
    parameters of their own and exactly one child with parameters (a gated student's graph)."""
    path, module = "", model
    while not _own_params(module, replicated):
        holders = [(name, child) for name, child in module.named_children() if _has_params(child, replicated)]
        if len(holders) != 1:
            break
        name, module = holders[0]
        path = f"{path}.{name}" if path else name
    return path, module


def _own_params(module: nn.Module, replicated: set[int]) -> bool:
    return any(id(p) not in replicated for p in module.parameters(recurse=False))


def _has_params(module: nn.Module, replicated: set[int]) -> bool:
    return any(id(p) not in replicated for p in module.parameters())


def _is_repeated(module: nn.Module) -> bool:
    """Children named 0, 1, ..., n - 1 (n >= 2): a ModuleList, a Sequential, captured blocks."""
    names = [name for name, _ in module.named_children()]
    return len(names) >= 2 and names == [str(i) for i in range(len(names))]


def _contains_repeated(module: nn.Module) -> bool:
    return any(_is_repeated(m) for m in module.modules())


def shard_units(model: nn.Module, replicated: Iterable[nn.Parameter] = ()) -> list[str]:
    """Qualified names of the submodules that become FSDP units (before the checks that may merge
    some into the root unit): each repeated submodule, every other child with parameters on the
    way down to them, or, without repeated submodules, the top-level children with parameters."""
    ids = {id(p) for p in replicated}
    prefix, body = _body(model, ids)
    units: list[str] = []

    def visit(path: str, module: nn.Module) -> None:
        repeated = _is_repeated(module)
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if not _has_params(child, ids):
                continue
            if repeated or not _contains_repeated(child):
                units.append(child_path)
            else:
                visit(child_path, child)

    visit(prefix, body)
    return units


def _shared_units(model: nn.Module, units: Sequence[str]) -> set[str]:
    """Units holding a parameter that is also registered outside them (a tied weight)."""
    owners: dict[int, set[str | None]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), set()).add(_owner(name, units))
    return {u for found in owners.values() if len(found) > 1 for u in found if u is not None}


def _owner(name: str, units: Iterable[str]) -> str | None:
    return next((u for u in units if name == u or name.startswith(u + ".")), None)


# --- outlining a captured graph's units ------------------------------------------------------

def _call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A module defined outside the unit, called from the unit's outlined graph."""
    return module(*args, **kwargs)


def _outline(gm: torch.fx.GraphModule, units: Sequence[str]) -> list[str]:
    """Move the graph nodes that read each unit's parameters into that unit's ``forward`` and call
    the unit from the graph instead; -> the units outlined. Each unit's stretch runs from the first
    to the last node that reads its parameters or calls its modules; units whose stretches overlap
    (a weight read at both ends of the model), or whose parameters reach the graph output, are
    left as they are."""
    graph = gm.graph
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    spans: dict[str, tuple[int, int]] = {}
    attrs: dict[str, list[torch.fx.Node]] = {u: [] for u in units}
    for unit in units:
        readers: set[torch.fx.Node] = set()
        for node in nodes:
            if node.op in ("get_attr", "call_module") and _owner(node.target, [unit]):
                if node.op == "get_attr":
                    attrs[unit].append(node)
                    readers.update(node.users)
                else:
                    readers.add(node)
        if readers and not any(r.op in ("output", "placeholder", "get_attr") for r in readers):
            spans[unit] = (min(position[r] for r in readers), max(position[r] for r in readers))
    ordered = sorted(spans, key=lambda u: spans[u])
    overlapping = {u for a, b in itertools.pairwise(ordered) if spans[b][0] <= spans[a][1] for u in (a, b)}
    kept = [u for u in ordered if u not in overlapping]
    for unit in reversed(kept):  # from the end, so earlier positions stay valid
        start, end = spans[unit]
        _outline_one(gm, unit, attrs[unit], nodes[start:end + 1])
    graph.lint()
    gm.recompile()
    return kept


def _outline_one(gm: torch.fx.GraphModule, unit: str, attr_nodes: list[torch.fx.Node],
                 stretch: list[torch.fx.Node]) -> None:
    graph = gm.graph
    region = attr_nodes + [n for n in stretch if n.op != "get_attr"]
    inside = set(region)
    foreign_modules: dict[str, torch.fx.Node] = {}
    with graph.inserting_before(stretch[0]):
        for node in region:
            if node.op == "call_module" and not _owner(node.target, [unit]) and node.target not in foreign_modules:
                foreign_modules[node.target] = graph.get_attr(node.target)
    inputs: list[torch.fx.Node] = list(foreign_modules.values())
    for node in region:
        for source in node.all_input_nodes:
            if source not in inside and source not in inputs:
                inputs.append(source)
    outputs = [n for n in region if any(user not in inside for user in n.users)]

    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {n: sub.placeholder(f"arg{i}") for i, n in enumerate(inputs)}
    for node in region:
        if node.op == "call_module" and node.target in foreign_modules:
            args = torch.fx.map_arg(node.args, env.__getitem__)
            kwargs = torch.fx.map_arg(node.kwargs, env.__getitem__)
            env[node] = sub.call_function(_call_module, (env[foreign_modules[node.target]], *args), kwargs)
            continue
        copied = sub.node_copy(node, env.__getitem__)
        if node.op in ("get_attr", "call_module"):
            copied.target = node.target[len(unit) + 1:]
        env[node] = copied
    sub.output(tuple(sub.call_function(_owned, (env[n],)) for n in outputs))

    module = gm.get_submodule(unit)
    code = torch.fx.GraphModule(module, sub)  # generates the forward; its attributes are the unit's own
    module.forward = types.MethodType(type(code).forward, module)
    with graph.inserting_after(stretch[-1]):
        call = graph.call_module(unit, tuple(inputs))
    with graph.inserting_after(call):
        results = [graph.call_function(_getitem, (call, i)) for i in range(len(outputs))]
    for node, result in zip(outputs, results, strict=True):
        node.replace_all_uses_with(result, delete_user_cb=lambda user: user not in inside)
    for node in reversed(region):
        graph.erase_node(node)


def _getitem(values: Sequence[Any], index: int) -> Any:
    return values[index]


def _owned(value: Any) -> Any:
    """A unit's output as a tensor of its own: FSDP registers its backward hook on the outputs, and an
    in-place op on a view would bypass it."""
    return value.clone() if isinstance(value, torch.Tensor) and value._is_view() else value


# --- the check: which unit's parameters each op reads ----------------------------------------

class _ReadProbe(TorchFunctionMode):
    """Records, per unit, whether its forward ran and whether its parameters were read outside it."""

    def __init__(self, owner_of: Mapping[int, str]):
        super().__init__()
        self.owner_of = owner_of
        self.running: list[str] = []
        self.called: set[str] = set()
        self.outside: set[str] = set()

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (), kwargs: Mapping | None = None) -> Any:
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            unit = self.owner_of.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if unit is not None and unit not in self.running:
                self.outside.add(unit)
        return func(*args, **kwargs)


def _probe(model: nn.Module, units: dict[str, nn.Module], example: tuple[tuple, dict[str, Any]]) -> set[str]:
    """The units that one eval forward on ``example`` shows cannot be sharded on their own."""
    owner_of = {id(p): name for name, module in units.items() for p in module.parameters()}
    probe = _ReadProbe(owner_of)
    handles = []
    for name, module in units.items():
        def enter(module: nn.Module, args: Any, name: str = name) -> None:
            probe.running.append(name)
            probe.called.add(name)

        def leave(module: nn.Module, args: Any, output: Any, name: str = name) -> None:
            probe.running.remove(name)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    args, kwargs = example
    try:
        with eval_mode(model), torch.no_grad(), probe:
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return (set(units) - probe.called) | probe.outside


# --- sharding --------------------------------------------------------------------------------

def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is (or contains) an FSDP2 unit."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: a sharded parameter's local shard, others whole."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


class ShardedModel:
    """A model's FSDP2-sharded training copy (``module``) and the way back (:meth:`finish`)."""

    def __init__(self, original: nn.Module, module: nn.Module, units: list[str], released: dict[str, nn.Parameter],
                 hooks: list[Any], full_bytes: int):
        self.original, self.module, self.units, self.full_bytes = original, module, units, full_bytes
        self._released, self._hooks = released, hooks

    def finish(self) -> nn.Module:
        """Gather the trained full parameters on every rank back into the original model (in place)
        and drop the sharded copy; -> the original model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        for name, param in self._released.items():
            param.data = full[name].to(param.device)
        for hook in self._hooks:
            hook.remove()
        self._released, self._hooks = {}, []
        self.module = None
        return self.original


def shard(model: nn.Module, ctx: DistContext, *, replicated: Iterable[nn.Parameter] = (),
          example: tuple[tuple, dict[str, Any]] | None = None) -> ShardedModel:
    """An FSDP2-sharded training copy of ``model`` (see the module docstring).

    ``replicated``: parameters every rank keeps whole (their gradients are averaged over the
    ranks). ``example``: ``(args, kwargs)`` for the check that each unit's parameters are read only
    inside its forward; without it every candidate unit is trusted.
    """
    if not ctx.distributed:
        check_strategy("fsdp", ctx.world_size)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kept_whole = {id(p) for p in replicated}
    full_bytes = parameter_bytes(model)
    copy_ = _training_copy(model)
    units = shard_units(copy_, [p for p in copy_.parameters() if id(p) in kept_whole])
    units = [u for u in units if u not in _shared_units(copy_, units)]
    graphs = [(name, m) for name, m in copy_.named_modules() if isinstance(m, torch.fx.GraphModule)]
    for prefix, graph_module in graphs:  # a graph never calls its submodules: outline, or leave to the root
        inside = [u for u in units if not prefix or u.startswith(prefix + ".")]
        outlined = {f"{prefix}.{u}" if prefix else u
                    for u in _outline(graph_module, [u[len(prefix) + 1:] if prefix else u for u in inside])}
        units = [u for u in units if u not in inside or u in outlined]
    modules = {u: copy_.get_submodule(u) for u in units}
    if example is not None:
        unfit = _probe(copy_, modules, example)
        modules = {u: m for u, m in modules.items() if u not in unfit}
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    ignored = {p for p in copy_.parameters() if id(p) in kept_whole}
    for module in modules.values():
        fully_shard(module, mesh=mesh, ignored_params=ignored)
    fully_shard(copy_, mesh=mesh, ignored_params=ignored)
    hooks = [p.register_post_accumulate_grad_hook(_average_over_ranks(ctx.world_size)) for p in ignored
             if p.requires_grad]
    released = _release(model, kept_whole)
    return ShardedModel(model, copy_, list(modules), released, hooks, full_bytes)


def _training_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``'s structure sharing every parameter and buffer (no tensor is copied);
    graph modules' ``meta`` (analysis results) is left out of the copy."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    metas = [(m, dict(m.meta)) for m in model.modules() if isinstance(getattr(m, "meta", None), dict)]
    for module, _ in metas:
        module.meta.clear()
    try:
        return copy.deepcopy(model, memo)
    finally:
        for module, saved in metas:
            module.meta.update(saved)


def _release(model: nn.Module, kept_whole: set[int]) -> dict[str, nn.Parameter]:
    """Free the full tensors of the sharded parameters in the original model (the sharded copy
    holds its shards); -> the parameters, by name, for :meth:`ShardedModel.finish` to refill."""
    released = {}
    for name, param in model.named_parameters():
        if id(param) not in kept_whole:
            released[name] = param
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    return released


def _average_over_ranks(world_size: int) -> Callable[[torch.Tensor], None]:
    def average(param: torch.Tensor) -> None:
        torch.distributed.all_reduce(param.grad)
        param.grad.div_(world_size)

    return average


# --- sharded checkpoints ---------------------------------------------------------------------

def save_sharded(folder: str | Path, model: nn.Module,
                 optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Write every rank's shards of ``model``'s parameters and the optimisers' tensor state into
    ``folder`` (all ranks call it); -> the optimisers' non-tensor state (hyper-parameters), the
    same on every rank, for the caller's checkpoint file. ``folder`` is replaced when it exists."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    if torch.distributed.get_rank() == 0 and folder.exists():
        shutil.rmtree(folder)
    torch.distributed.barrier()
    tensors, rest = _flatten(model, optimizers, get_state_dict)
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True))
    return rest


def load_sharded(folder: str | Path, model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer],
                 rest: Mapping[str, Any]) -> None:
    """Read back what :func:`save_sharded` wrote into the (identically sharded) model and optimisers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder)
    if not folder.is_dir():
        raise GraphMergeError(f"the checkpoint names the sharded state {folder}, which does not exist; the "
                              f"checkpoint folder is incomplete. Restart the run in a new checkpoint folder.")
    tensors, _ = _flatten(model, optimizers, get_state_dict)
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    model_state, optim_state = _unflatten(tensors, rest)
    for name, optimizer in optimizers.items():
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state[name])


def _flatten(model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer],
             get_state_dict: Callable) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(every tensor under a flat key, the non-tensor optimiser state by optimiser name)."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {}
    model_state = None
    for name, optimizer in optimizers.items():
        model_state, optim_state = get_state_dict(model, optimizer)
        rest[name] = {"param_groups": optim_state["param_groups"], "state": {}}
        for fqn, values in optim_state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{name}/{fqn}/{key}"] = value
                else:
                    rest[name]["state"].setdefault(fqn, {})[key] = value
    if model_state is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        model_state = get_model_state_dict(model)
    tensors.update({f"model/{fqn}": value for fqn, value in model_state.items()})
    return tensors, rest


def _unflatten(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> tuple[dict, dict]:
    model_state = {key[len("model/"):]: value for key, value in tensors.items() if key.startswith("model/")}
    optim_state: dict[str, dict[str, Any]] = {}
    for name, saved in rest.items():
        state: dict[str, dict[str, Any]] = {fqn: dict(values) for fqn, values in saved["state"].items()}
        prefix = f"optim/{name}/"
        for key, value in tensors.items():
            if key.startswith(prefix):
                fqn, field = key[len(prefix):].rsplit("/", 1)
                state.setdefault(fqn, {})[field] = value
        optim_state[name] = {"state": state, "param_groups": saved["param_groups"]}
    return model_state, optim_state


# --- the recipe's checkpoints ----------------------------------------------------------------

def checkpoint_entries(model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer],
                       checkpoint_dir: str | Path | None, tag: str) -> dict[str, Any]:
    """What a recipe checkpoint holds for a phase's model and optimisers: their state dicts, or, for a
    sharded model, its shards written (by every rank) to ``sharded/<tag>`` in ``checkpoint_dir`` and
    the entry naming them."""
    if not is_sharded(model):
        return {"model": model.state_dict(), "optim": {k: o.state_dict() for k, o in optimizers.items()}}
    if checkpoint_dir is None:
        return {}
    folder = f"{SHARDED_FOLDER}/{tag}"
    rest = save_sharded(Path(checkpoint_dir) / folder, model, optimizers)
    return {"sharded": {"folder": folder, "optim": rest}}


def restore_entries(model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer], saved: Mapping[str, Any],
                    checkpoint_dir: str | Path) -> None:
    """Load what :func:`checkpoint_entries` saved back into the model and its optimisers."""
    if "sharded" in saved:
        if not is_sharded(model):
            raise GraphMergeError("this checkpoint holds a sharded model (written with strategy='fsdp', --shard); "
                                  "resume it under torchrun with --shard, or start over in a new checkpoint folder.")
        entry = saved["sharded"]
        load_sharded(Path(checkpoint_dir) / entry["folder"], model, optimizers, entry["optim"])
        return
    model.load_state_dict(saved["model"])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(saved["optim"][name])


def prune_sharded(checkpoint_dir: str | Path | None, entries: Mapping[str, Any], ctx: DistContext) -> None:
    """After a checkpoint is committed: delete the sharded folders it no longer names (main rank)."""
    root = Path(checkpoint_dir) / SHARDED_FOLDER if checkpoint_dir is not None else None
    if root is None or not ctx.is_main or not root.is_dir():
        return
    current = entries.get("sharded", {}).get("folder")
    for folder in root.iterdir():
        if folder.is_dir() and f"{SHARDED_FOLDER}/{folder.name}" != current:
            shutil.rmtree(folder)


def memory_report(sharded: ShardedModel, ctx: DistContext) -> dict[str, Any]:
    """Parameter bytes per rank (local shards plus replicated parameters) against the unsharded model."""
    local = parameter_bytes(sharded.module)
    per_rank: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(per_rank, local)
    return {"units": len(sharded.units), "param_bytes_unsharded": sharded.full_bytes, "param_bytes_per_rank": per_rank,
            "ratio": max(per_rank) / max(sharded.full_bytes, 1)}

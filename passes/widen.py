"""Widen: N teachers of one architecture become one big student that computes their mean.

Every parameter and buffer is built by scattering each teacher's tensor into its block along
every widened dimension (``graphmerge.passes.layout``); off-diagonal blocks start at zero and train.
Positions all teachers share (image channels, logits) receive every teacher: shared inputs
stack the teachers' filters, and a layer writing a shared output gets each teacher's weight
divided by N and the mean bias, so the big student averages the teachers.

The graph itself is the teachers' traced graph with width attributes rewritten; ops whose result
depends on channel layout either stay valid by construction (cat, chunk: see ``graphmerge.passes.layout``)
or get their literal sizes rewritten (view, split sizes, slices). A LayerNorm across a widened
dim becomes N block-wise LayerNorms, which is exact.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from graphmerge.passes.capture import node_shape
from graphmerge.passes.couple import DimLayout
from graphmerge.passes.errors import GraphMergeError
from graphmerge.passes.groups import GroupSet
from graphmerge.passes.layout import LayoutError, shared_mask, teacher_maps
from graphmerge.passes.util import getattr_path
from torch import nn


@dataclass
class WidenInfo:
    """What compress and gate need to know about a big student; stored in ``big.meta``."""

    groups: GroupSet
    n_teachers: int
    teacher: nn.Module
    untraced: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # Integer scalars (BatchNorm's num_batches_tracked): one value per teacher, and the value the
    # big student started with, so compress can hand each teacher its own count back (I2) plus
    # whatever the big student counted since.
    counters: list[dict[str, torch.Tensor]] = field(default_factory=list)
    counters_start: dict[str, torch.Tensor] = field(default_factory=dict)
    # The inputs the analysis ran on; compress certifies its result (I3) on them.
    example_inputs: tuple = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    # what the teachers' own class needs beside them (use_cache=False where capture dropped a cache)
    class_kwargs: dict[str, Any] = field(default_factory=dict)
    # layers that average the teachers with an explicit 1/N (their weight is tied, see _average_tied_heads)
    tied_heads: list[str] = field(default_factory=list)
    certificates: dict[str, Any] = field(default_factory=dict)
    # parameters stacked per teacher (token-mixing layers): name -> the widened groups whose
    # channels each teacher's copy is applied to
    per_teacher: dict[str, list[int]] = field(default_factory=dict)
    # where the batch sits in each gated activation (graphmerge.passes.batch), located by add_gates
    batch_places: dict[str, Any] = field(default_factory=dict)
    # how a group a normalisation spans is selected (see gate.select_channels): "block", one teacher's
    # whole block (the student normalises over what the big student normalised over, so I3 holds),
    # or "mixed", the top channels of any teachers
    normalised_selection: str = "block"

    @property
    def widths(self) -> dict[int, int]:
        return {g.id: g.width for g in self.groups}

    @property
    def widened(self) -> set[int]:
        return {g.id for g in self.groups.widened}


def widen(groups: GroupSet, teachers: list[nn.Module]) -> torch.fx.GraphModule:
    """Build the big student from the analysed teacher graph and N teachers (not modified)."""
    n = len(teachers)
    layout = groups.layout
    widths = {g.id: g.width for g in groups}
    widened = {g.id for g in groups.widened}
    for g in groups.internal_pinned:
        warnings.warn(f"group {g.id} (width {g.width}) is pinned inside the network: {g.reason}. "
                      "widen averages its parameters, so the big student does not compute the "
                      "teachers' mean (invariant I1 cannot hold for this model).", stacklevel=3)

    big = copy_structure(groups.graph_module)
    states = [t.state_dict() for t in teachers]
    traced_names = set(big.state_dict().keys())
    constants = groups.graph_module.state_dict() | dict(groups.graph_module.named_buffers())
    per_teacher = per_teacher_layers(big, groups, widened)
    stacked = {param: [dim_layout] for _, _, dim_layout, params in per_teacher.values() for param in params}
    operands = per_teacher_operands(big, groups, widened)
    for param, sites in operands.items():
        stacked.setdefault(param, []).extend(dim_layout for *_, dim_layout in sites)
    built: dict[str, torch.Tensor] = {}
    for name, canonical in tied_names(groups).items():
        if canonical not in built:
            dims = layout.params.get(canonical)
            tensors = [_teacher_tensor(t, s, canonical, constants[canonical]) for t, s in zip(teachers, states,
                                                                                             strict=True)]
            if canonical in stacked:
                new = torch.stack(tensors)
            else:
                new = _scatter(tensors, dims, layout.out_dims.get(canonical), n, widths, widened, canonical)
            current = getattr_path(big, canonical)
            built[canonical] = nn.Parameter(new, requires_grad=current.requires_grad) \
                if isinstance(current, nn.Parameter) else new
        set_tensor(big, name, built[canonical])
    _rewrite_per_teacher(big, per_teacher, n, widths, widened)
    _rewrite_per_teacher_operands(big, operands, n, widths, widened)
    _rewrite_literals(big, groups, n, widths, widened)
    _rewrite_permutations(big, groups, n, widths, widened)
    _average_outputs(big, groups, n, widths, widened)
    big.recompile()
    # tensors the graph never reads (an aux classifier skipped in eval mode) come back per teacher
    unread = {name for name, canonical in tied_names(groups).items() if canonical not in _read_names(groups)}
    untraced = [{k: v.clone() for k, v in s.items() if k not in traced_names or k in unread} for s in states]
    start = {k: v.clone() for k, v in big.state_dict().items() if _is_counter(v)}
    counters = [{k: s[k].clone() for k in start if k in s} for s in states]
    tied = big.meta.pop("graphmerge_tied_heads", [])
    big.meta["graphmerge"] = WidenInfo(
        groups, n, copy_structure(teachers[0]), untraced, counters, start, tied_heads=tied,
        per_teacher={param: sorted({g for dim in dims for g in dim.group[dim.group >= 0].tolist()})
                     for param, dims in stacked.items()})
    return big


def _average_outputs(big: torch.fx.GraphModule, groups: GroupSet, n: int, widths: dict[int, int],
                     widened: set[int]) -> None:
    """Graph outputs holding an averaged group (``Group.averaged``) leave the big student as the
    mean of the teachers' blocks, taken after the non-linear ops that follow the last layer."""
    averaged = [g.id for g in groups if g.averaged]
    if not averaged:
        return
    output = next(node for node in big.graph.nodes if node.op == "output")
    index = 0

    def average(value: Any) -> Any:
        nonlocal index
        dims = groups.layout.nodes.get(value.name) if isinstance(value, torch.fx.Node) else None
        if not dims:
            return value
        for d, dim in enumerate(dims):
            if dim is not None and np.isin(dim.group, averaged).any():
                _, maps = teacher_maps(dim, n, widths, widened)
                buffer = f"graphmerge_output_blocks_{index}"
                index += 1
                big.register_buffer(buffer, torch.as_tensor(np.stack(maps)), persistent=False)
                with big.graph.inserting_before(output):
                    blocks = big.graph.get_attr(buffer)
                    value = big.graph.call_function(mean_of_teacher_blocks, (value, blocks, d))
        return value

    output.args = torch.fx.node.map_aggregate(output.args, average)


def mean_of_teacher_blocks(x: torch.Tensor, blocks: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean over teachers of ``x``'s positions ``blocks[t]`` along ``dim``."""
    n, width = blocks.shape
    return x.index_select(dim, blocks.reshape(-1)).unflatten(dim, (n, width)).mean(dim)


Site = tuple[torch.fx.Node, int, int, DimLayout]


def per_teacher_operands(gm: torch.fx.GraphModule, groups: GroupSet, widened: set[int]) -> dict[str, list[Site]]:
    """Parameters without a channel dim broadcast against a widened one (``layout.per_teacher_operands``):
    parameter -> its sites (node, argument position, the output's channel dim, that dim's layout).
    Only parameters whose every read is such a site: any other read needs the teachers' one shape."""
    layout = groups.layout
    widened_list = list(widened)
    nodes = {node.name: node for node in gm.graph.nodes}
    sites: dict[str, list[Site]] = {}
    for (node_name, position), (param, dim) in layout.per_teacher_operands.items():
        dims = layout.nodes.get(node_name)
        if node_name in nodes and dims is not None and dims[dim] is not None \
                and np.isin(dims[dim].group, widened_list).any():
            sites.setdefault(param, []).append((nodes[node_name], position, dim, dims[dim]))
    found = {}
    for param, param_sites in sites.items():
        covered = {(node.name, position) for node, position, *_ in param_sites}
        reads = [(user.name, position) for read in gm.graph.nodes if read.op == "get_attr" and str(read.target) == param
                 for user in read.users for position, arg in enumerate(user.args) if arg is read]
        if all(read in covered for read in reads):
            found[param] = param_sites
    return found


def _rewrite_per_teacher_operands(big: torch.fx.GraphModule, operands: dict[str, list[Site]], n: int,
                                  widths: dict[int, int], widened: set[int]) -> None:
    """Each site reads the stacked parameter through ``per_teacher_values``: teacher t's value at
    teacher t's positions of the channel dim, the teachers' mean at shared positions."""
    index = 0
    for param in sorted(operands):
        for node, position, dim, dim_layout in operands[param]:
            size, maps = teacher_maps(dim_layout, n, widths, widened)
            owner = np.full(size, n, np.int64)
            for t in range(n):
                owner[maps[t]] = t
            for t in range(1, n):
                owner[maps[t][maps[t] == maps[0]]] = n  # shared positions: every teacher writes the same one
            buffer = f"graphmerge_teacher_of_position_{index}"
            index += 1
            big.register_buffer(buffer, torch.as_tensor(owner), persistent=False)
            with big.graph.inserting_before(node):
                owners = big.graph.get_attr(buffer)
                values = big.graph.call_function(per_teacher_values, (node.args[position], owners, dim,
                                                                      len(node_shape(node) or ())))
            args = list(node.args)
            args[position] = values
            node.args = tuple(args)


@torch.fx.wrap
def per_teacher_values(stacked: torch.Tensor, owner: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """From ``stacked`` (N teachers' copies of a parameter without channels), a tensor that
    broadcasts like the parameter but holds, along output dim ``dim``, the value of the teacher
    that owns each position (``owner``; ``N`` is a shared position, which gets the mean)."""
    rows = torch.cat([stacked, stacked.mean(0, keepdim=True)])
    shape = (1,) * (ndim - (stacked.ndim - 1)) + tuple(stacked.shape[1:])
    values = rows.reshape(rows.shape[0], *shape).index_select(0, owner)
    return values.movedim(0, dim + 1).flatten(dim, dim + 1)


def per_teacher_layers(gm: torch.fx.GraphModule, groups: GroupSet,
                       widened: set[int]) -> dict[str, tuple[torch.fx.Node, int, DimLayout, list[str]]]:
    """Token-mixing layers whose input carries a widened channel dim while their weight does not:
    node name -> (the node, that dim of its input, the dim's layout, the parameters to stack)."""
    layout = groups.layout
    widened_list = list(widened)
    nodes = {node.name: node for node in gm.graph.nodes}
    found = {}
    for name, (dims, weight, bias) in layout.per_teacher.items():
        node = nodes.get(name)
        source = node.args[0] if node is not None and node.args else None
        source_dims = layout.nodes.get(source.name) if isinstance(source, torch.fx.Node) else None
        if source_dims is None:
            continue
        params = [p for p in (weight, bias) if p is not None]
        if any(np.isin(d.group, widened_list).any() for p in params for d in layout.params.get(p, []) if d is not None):
            continue  # the weight itself is widened: an ordinary layer
        candidates = [d for d in dims if source_dims[d] is not None
                      and np.isin(source_dims[d].group, widened_list).any()]
        if not candidates:
            continue
        if len(candidates) > 1 or not np.isin(source_dims[candidates[0]].group, widened_list).all():
            raise LayoutError(f"{name}: a token-mixing layer over an input with several widened dims, or a dim "
                              "mixing widened and shared channels; it cannot be applied per teacher")
        users = [user for read in gm.graph.nodes if read.op == "get_attr" and str(read.target) in params
                 for user in read.users if user is not node]
        if users:
            raise LayoutError(f"{name}: its weight is also read elsewhere, so it cannot be stacked per teacher")
        found[name] = (node, candidates[0], source_dims[candidates[0]], params)
    return found


def _rewrite_per_teacher(big: torch.fx.GraphModule,
                         layers: dict[str, tuple[torch.fx.Node, int, DimLayout, list[str]]],
                         n: int, widths: dict[int, int], widened: set[int]) -> None:
    """``linear(x, W, b)`` over a non-channel axis becomes each teacher's ``linear`` on its block."""
    from graphmerge.passes.registry import op_args

    for index, (node, dim, dim_layout, _) in enumerate(layers[name] for name in sorted(layers)):
        args = op_args(node)
        x = args["input"]
        _, maps = teacher_maps(dim_layout, n, widths, widened)
        buffer = f"graphmerge_teacher_blocks_{index}"
        big.register_buffer(buffer, torch.as_tensor(np.stack(maps), dtype=torch.long), persistent=False)
        with big.graph.inserting_before(node):
            blocks = big.graph.get_attr(buffer)
            call = big.graph.call_function(per_teacher_linear, (x, args["weight"], args.get("bias"), dim, blocks))
        node.replace_all_uses_with(call)
        alias(big, call, node.name)
        big.graph.erase_node(node)


def per_teacher_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dim: int,
                       blocks: torch.Tensor) -> torch.Tensor:
    """Teacher t's ``linear(·, weight[t], bias[t])`` on teacher t's positions ``blocks[t]`` of ``dim``."""
    dim = dim % x.ndim
    n, width = blocks.shape
    grouped = x.index_select(dim, blocks.reshape(-1)).unflatten(dim, (n, width))
    out = torch.stack([F.linear(grouped.select(dim, t), weight[t], None if bias is None else bias[t])
                       for t in range(n)], dim).flatten(dim, dim + 1)
    return torch.empty_like(out).index_copy_(dim, blocks.reshape(-1), out)


def tied_names(groups: GroupSet) -> dict[str, str]:
    """Every state_dict name of the analysed graph -> the name it is laid out by. Names that hold
    one tensor (tied input and output embeddings) share the name the graph reads, so the big
    student and the student keep them tied."""
    state = groups.graph_module.state_dict(keep_vars=True)
    # non-persistent buffers the analysis laid out (BlurPool's constant depthwise filter) widen too
    state |= {name: buffer for name, buffer in groups.graph_module.named_buffers()
              if name not in state and name in groups.layout.params}
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in state.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    read = _read_names(groups)
    canonical = {}
    for names in by_tensor.values():
        laid_out = [name for name in names if name in groups.layout.params and name in read]
        for name in names:
            canonical[name] = (laid_out or names)[0]
    return canonical


def _read_names(groups: GroupSet) -> set[str]:
    return {str(node.target) for node in groups.graph_module.graph.nodes if node.op == "get_attr" and node.users}


def widen_info(big: nn.Module) -> tuple[torch.fx.GraphModule, WidenInfo]:
    """The big GraphModule and its WidenInfo, from a big student or a gated big student."""
    graph_module = getattr(big, "graph_module", big)
    info = getattr(graph_module, "meta", {}).get("graphmerge")
    if not isinstance(info, WidenInfo):
        raise GraphMergeError(
            f"compress needs a big student made by graphmerge.widen (or gated by graphmerge.add_gates); "
            f"got a {type(big).__name__} without graphmerge metadata. Build it with graphmerge.widen(teachers, "
            "example_inputs) first.")
    return graph_module, info


def teacher_graph(groups: GroupSet, teacher: nn.Module) -> torch.fx.GraphModule:
    """The analysed graph holding ``teacher``'s own tensors (same node names as the big student)."""
    graph = copy_structure(groups.graph_module)
    state = teacher.state_dict()
    constants = groups.graph_module.state_dict() | dict(groups.graph_module.named_buffers())
    for name in graph.state_dict():
        set_tensor(graph, name, _teacher_tensor(teacher, state, name, constants[name]))
    return graph


def node_expectations(groups: GroupSet, n: int) -> Any:
    """How each node of the big student relates to the same node of the N teachers (for certify).

    Along a widened dim teacher t's values sit at its positions of the teacher-major layout; a
    node with no widened dim holds the teachers' mean. Nodes with joint (reshaped) channel blocks
    or permuted dims are not compared.
    """
    widths = {g.id: g.width for g in groups}
    widened = {g.id for g in groups.widened}

    def expected_of(name: str, value: torch.Tensor, own: list[torch.Tensor]) -> list[tuple[Any, torch.Tensor]]:
        dims = groups.layout.nodes.get(name)
        if dims is None or len(dims) != value.ndim or any(d is None for d in dims):
            same = all(v.shape == value.shape for v in own)
            return [(None, torch.stack(own).mean(0))] if same and dims is None else []
        if not any(np.isin(d.group, list(widened)).any() for d in dims):
            return [(None, torch.stack(own).mean(0))] if all(v.shape == value.shape for v in own) else []
        try:
            maps = [teacher_maps(d, n, widths, widened)[1] for d in dims]
        except LayoutError:
            return []
        pairs = []
        for t in range(n):
            index = np.ix_(*[m[t] for m in maps])
            pairs.append((tuple(torch.as_tensor(i) for i in index), own[t]))
        return pairs

    return expected_of


def locate_divergence(groups: GroupSet, n: int) -> Any:
    """A ``locate`` callback for ``certify.certify_mean``: names the first big node that differs
    (the big student's and the teachers' graphs streamed in lockstep, ``stream.first_divergence``)."""
    from graphmerge.passes.registry import describe
    from graphmerge.passes.stream import first_divergence

    def locate(big: Any, teachers: list[Any], inputs: list[Any], dtype: torch.dtype, tolerance: float) -> str:
        return first_divergence(big, teachers, inputs, dtype, tolerance, node_expectations(groups, n), describe)

    return locate


def _is_counter(tensor: torch.Tensor) -> bool:
    """An integer scalar such as BatchNorm's ``num_batches_tracked`` (not a flag: bools are not counts)."""
    return tensor.ndim == 0 and not tensor.is_floating_point() and not tensor.is_complex() \
        and tensor.dtype != torch.bool


def _teacher_tensor(teacher: nn.Module, state: dict[str, torch.Tensor], name: str,
                    traced: torch.Tensor) -> torch.Tensor:
    """A teacher's tensor by name: from its state_dict, else a plain tensor attribute, else the
    constant the tracer captured (``_tensor_constantN``), which all teachers share."""
    if name in state:
        return state[name]
    value = getattr_path(teacher, name, None)
    return value if isinstance(value, torch.Tensor) else traced


def copy_structure(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are empty placeholders on the meta device.

    The caller assigns every state_dict tensor afterwards (non-persistent buffers are copied);
    copying the real ones first would be wasted work.
    """
    memo: dict[int, Any] = {}
    for tensor in module.state_dict(keep_vars=True).values():
        placeholder = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        memo[id(tensor)] = nn.Parameter(placeholder, tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else placeholder
    meta = getattr(module, "meta", None)
    saved = dict(meta) if isinstance(meta, dict) else None
    if saved is not None:
        meta.clear()
    try:
        return copy.deepcopy(module, memo)
    finally:
        if saved is not None:
            meta.update(saved)


def _scatter(tensors: list[torch.Tensor], dims: list[DimLayout | None] | None, out_dim: int | None,
             n: int, widths: dict[int, int], widened: set[int], name: str) -> torch.Tensor:
    """One big tensor from N teachers' tensors: each into its block, shared positions averaged.

    Each teacher's block is written with strided copies (``index_copy`` where a dim is not one
    contiguous range), so the cost is linear in the tensor size. A position where every dim is
    shared belongs to all N teachers: it holds their mean. A position whose output dim is shared
    but an input dim is widened sums N teachers' partial products at run time, so its weight is
    divided by N.
    """
    reference = tensors[0]
    if dims is None or reference.ndim == 0:
        mean = torch.stack([t.to(torch.float64) for t in tensors]).mean(0)
        return mean.round().to(reference.dtype) if not reference.is_floating_point() \
            else mean.to(reference.dtype)
    sizes, maps, shared = [], [], []
    for d, dim in enumerate(dims):
        if dim is None:
            sizes.append(reference.shape[d])
            maps.append([np.arange(reference.shape[d])] * n)
            shared.append(np.ones(reference.shape[d], dtype=bool))
            continue
        try:
            size, per_teacher = teacher_maps(dim, n, widths, widened)
        except LayoutError as error:
            raise LayoutError(f"{name} dim {d}: {error}") from None
        sizes.append(size)
        maps.append(per_teacher)
        shared.append(shared_mask(dim, widened))
    total = torch.zeros(sizes, dtype=reference.dtype)
    for t, tensor in enumerate(tensors):
        _write_block(total, tensor, [maps[d][t] for d in range(len(sizes))])
    if all(mask.any() for mask in shared):
        where = [np.nonzero(mask)[0] for mask in shared]
        teacher_index = np.ix_(*where)
        mean = torch.stack([t[teacher_index].to(torch.float64) for t in tensors]).mean(0)
        if not reference.is_floating_point():
            mean = mean.round()
        big_index = np.ix_(*[maps[d][0][where[d]] for d in range(len(sizes))])
        total[big_index] = mean.to(reference.dtype)
    if out_dim is not None and dims[out_dim] is not None and shared[out_dim].any() \
            and not all(mask.all() for d, mask in enumerate(shared) if d != out_dim):
        rows = torch.as_tensor(maps[out_dim][0][shared[out_dim]])
        masks = _big_masks(shared, maps, sizes)
        masks[out_dim] = np.ones(len(rows), dtype=bool)
        head = total.index_select(out_dim, rows)
        head = torch.where(torch.as_tensor(_outer_and(masks)), head, head / n)
        total.index_copy_(out_dim, rows, head)
    return total


def _big_masks(shared: list[np.ndarray], maps: list[list[np.ndarray]], sizes: list[int]) -> list[np.ndarray]:
    """Per dim, which big positions are shared (indexed like the teachers' positions for rows)."""
    out = []
    for d, mask in enumerate(shared):
        big = np.zeros(sizes[d], dtype=bool)
        big[maps[d][0]] = mask
        out.append(big)
    return out


def _write_block(total: torch.Tensor, tensor: torch.Tensor, maps: list[np.ndarray]) -> None:
    """``total[np.ix_(*maps)] = tensor``, with views for contiguous ranges and index_copy otherwise."""
    view = total
    index_dims = []
    for d, m in enumerate(maps):
        if len(m) and m[-1] - m[0] == len(m) - 1 and (len(m) < 2 or np.all(np.diff(m) == 1)):
            view = view.narrow(d, int(m[0]), len(m))
        else:
            index_dims.append(d)
    block = tensor
    for d in index_dims[:-1]:
        grown = list(block.shape)
        grown[d] = view.shape[d]
        block = torch.zeros(grown, dtype=block.dtype).index_copy_(d, torch.as_tensor(maps[d]), block)
    if not index_dims:
        view.copy_(block)
        return
    last = index_dims[-1]
    if len(index_dims) > 1:
        # the grown dims already hold zeros off-block: only fill this teacher's positions
        partial = view.index_select(last, torch.as_tensor(maps[last]))
        keep = _outer_and([_mask(maps[d], view.shape[d]) if d in index_dims[:-1] else
                           np.ones(partial.shape[d], dtype=bool) for d in range(partial.ndim)])
        block = torch.where(torch.as_tensor(keep), block, partial)
    view.index_copy_(last, torch.as_tensor(maps[last]), block)


def _mask(index: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[index] = True
    return mask


def _outer_and(masks: list[np.ndarray]) -> np.ndarray:
    result = np.ones([1] * len(masks), dtype=bool)
    for d, mask in enumerate(masks):
        shape = [1] * len(masks)
        shape[d] = -1
        result = result & np.asarray(mask).reshape(shape)
    return result


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``root`` by ``value`` (a Parameter stays one)."""
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    current = getattr(owner, attr)
    if isinstance(current, nn.Parameter):
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=current.requires_grad)
        setattr(owner, attr, value)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def block_layer_norm(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, blocks: int, eps: float,
                     weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    grouped = x.index_select(-1, order)
    shape = grouped.shape
    grouped = grouped.reshape(*shape[:-1], blocks, shape[-1] // blocks)
    normed = F.layer_norm(grouped, (shape[-1] // blocks,), eps=eps).reshape(shape)
    out = normed.index_select(-1, inverse)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


class BlockNorm(nn.Module):
    """The parameter-free part of ``BlockLayerNorm``, for ``F.layer_norm`` calls in a graph."""

    def __init__(self, order: torch.Tensor, blocks: int, eps: float):
        super().__init__()
        self.blocks = blocks
        self.eps = eps
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse", torch.argsort(order), persistent=False)

    def forward(self, x: torch.Tensor, weight: Any = None, bias: Any = None) -> torch.Tensor:
        return block_layer_norm(x, self.order, self.inverse, self.blocks, self.eps, weight, bias)


# -- literal sizes in the graph ------------------------------------------------------------------

def _rewrite_literals(big: torch.fx.GraphModule, groups: GroupSet, n: int, widths: dict[int, int],
                      widened: set[int]) -> None:
    norm_index = 0
    for node in list(big.graph.nodes):
        if node.target is torch.ops.aten.layer_norm.default:
            norm_index = _rewrite_layer_norm(big, node, groups.layout, n, widths, widened, norm_index)
    _rewrite_blockwise(big, groups, n, widths, widened)
    _average_tied_heads(big, groups, n, widened)
    rewrite_aten_sizes(big, groups, lambda dim: teacher_maps(dim, n, widths, widened)[0], widened)


def _average_tied_heads(big: torch.fx.GraphModule, groups: GroupSet, n: int, widened: set[int]) -> list[str]:
    """A layer that writes an output from widened channels averages the teachers: widen divides its
    weight by N. A weight tied to another use (GPT-2's lm_head is the token embedding) cannot be
    divided, so the layer's product is divided instead: ``linear(x, W) / N + b``. Returns the layers."""
    from graphmerge.passes.registry import op_args, param_root

    layout = groups.layout
    widened_list = list(widened)
    weight_out = {torch.ops.aten.linear.default: ("weight", 0, "bias"),
                  torch.ops.aten.addmm.default: ("mat2", 1, "self")}
    rewritten = []
    for node in list(big.graph.nodes):
        spec = weight_out.get(node.target)
        if spec is None:
            continue
        weight_arg, out_dim, bias_arg = spec
        args = op_args(node)
        param = param_root(args[weight_arg])
        dims = layout.params.get(param or "")
        out_layout = (layout.nodes.get(node.name) or [None])[-1]
        if param is None or dims is None or layout.out_dims.get(param) == out_dim or out_layout is None:
            continue
        in_layout = dims[1 - out_dim]
        if np.isin(out_layout.group, widened_list).any() or in_layout is None \
                or not np.isin(in_layout.group, widened_list).any():
            continue
        bias = args.get(bias_arg)
        with big.graph.inserting_after(node):
            scaled = big.graph.call_function(torch.ops.aten.mul.Tensor, (node, 1.0 / n))
        node.replace_all_uses_with(scaled)
        alias(big, scaled, node.name)
        scaled.args = (node, 1.0 / n)
        if isinstance(bias, torch.fx.Node):
            if node.target is torch.ops.aten.linear.default:
                node.args = (args["input"], args["weight"])
                node.kwargs = {}
            else:
                node.target = torch.ops.aten.mm.default
                node.args = (args["mat1"], args["mat2"])
                node.kwargs = {}
            with big.graph.inserting_after(scaled):
                biased = big.graph.call_function(torch.ops.aten.add.Tensor, (scaled, bias))
            scaled.replace_all_uses_with(biased)
            alias(big, biased, node.name)
            biased.args = (scaled, bias)
        rewritten.append(node.name)
    big.meta.setdefault("graphmerge_tied_heads", []).extend(rewritten)
    return rewritten


def _rewrite_blockwise(big: torch.fx.GraphModule, groups: GroupSet, n: int, widths: dict[int, int],
                       widened: set[int]) -> None:
    """Reductions and softmax over a widened channel dim run once per teacher's block (exact I1)."""
    nodes = {node.name: node for node in big.graph.nodes}
    for index, (name, dim) in enumerate(sorted(groups.layout.blockwise.items())):
        node = nodes.get(name)
        source = node.args[0] if node is not None else None
        dims = groups.layout.nodes.get(layout_name(big, source)) if isinstance(source, torch.fx.Node) else None
        layout_dim = dims[dim] if dims is not None else None
        if layout_dim is None or not np.isin(layout_dim.group, list(widened)).any():
            continue
        if not np.isin(layout_dim.group, list(widened)).all():
            raise LayoutError(f"{name}: a reduction over a dim that mixes widened and shared channels")
        _, maps = teacher_maps(layout_dim, n, widths, widened)
        buffer = f"graphmerge_blocks_{index}"
        big.register_buffer(buffer, torch.as_tensor(np.stack(maps), dtype=torch.long), persistent=False)
        from graphmerge.passes.registry import op_args

        args = op_args(node)
        args.pop("self", None)
        args.pop("input", None)
        with big.graph.inserting_before(node):
            blocks = big.graph.get_attr(buffer)
            call = big.graph.call_function(blockwise, (source, node.target, dim, blocks), args)
        node.replace_all_uses_with(call)
        alias(big, call, node.name)
        big.graph.erase_node(node)


def blockwise(x: torch.Tensor, op: Any, dim: int, blocks: torch.Tensor, /, **args: Any) -> torch.Tensor:
    """Apply a reduction (keepdim) or softmax over ``dim`` separately to each teacher's block.

    ``blocks[t]`` lists teacher t's positions along ``dim``. A reduction's result is broadcast back
    over its block, so the output has ``x``'s shape and feeds the elementwise ops that follow.
    """
    dim = dim % x.ndim
    n, width = blocks.shape
    grouped = x.index_select(dim, blocks.reshape(-1)).unflatten(dim, (n, width))
    if "keepdim" in args:
        reduced = args.pop("dim")
        reduced = [reduced] if isinstance(reduced, int) else list(reduced)
        reduced = [d % x.ndim for d in reduced]
        args["dim"] = [d + 1 if d >= dim else d for d in reduced]
        args["keepdim"] = True
        out = op(grouped, **args).expand(grouped.shape)
    else:
        args["dim"] = dim + 1
        out = op(grouped, **args)
    out = out.flatten(dim, dim + 1)
    return torch.empty_like(out).index_copy_(dim, blocks.reshape(-1), out)


def alias(gm: torch.fx.GraphModule, new: torch.fx.Node, old_name: str) -> None:
    """``new`` stands for the analysed node ``old_name``: later rewrites look its layout up by that."""
    aliases = gm.meta.setdefault("graphmerge_aliases", {})
    aliases[new.name] = aliases.get(old_name, old_name)


def layout_name(gm: torch.fx.GraphModule, node: Any) -> str | None:
    if not isinstance(node, torch.fx.Node):
        return None
    return gm.meta.get("graphmerge_aliases", {}).get(node.name, node.name)


def rewrite_aten_sizes(gm: torch.fx.GraphModule, groups: GroupSet, size_of, widened: set[int]) -> None:
    """Let every op's rule rewrite its literal arguments (``registry.OpRule.rewrite``)."""
    from graphmerge.passes.registry import SizeContext, rewrite_node

    layout = groups.layout
    widened_list = list(widened)

    def is_widened(dim: DimLayout) -> bool:
        return bool(np.isin(dim.group, widened_list).any())

    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_module"):
            continue
        source = node.args[0] if node.args else None
        input_dims = layout.nodes.get(layout_name(gm, source)) if isinstance(source, torch.fx.Node) else None
        rewrite_node(node, SizeContext(layout.nodes.get(node.name), input_dims, size_of, is_widened), gm)


def _rewrite_layer_norm(big: torch.fx.GraphModule, node: torch.fx.Node, layout, n: int,
                        widths: dict[int, int], widened: set[int], index: int) -> int:
    source = node.args[0]
    dims = layout.nodes.get(layout_name(big, source)) if isinstance(source, torch.fx.Node) else None
    last = dims[-1] if dims else None
    if last is None or not np.isin(last.group, list(widened)).any():
        return index
    _, maps = teacher_maps(last, n, widths, widened)
    order = torch.as_tensor(np.concatenate(maps), dtype=torch.long)
    eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    name = f"graphmerge_block_norm_{index}"
    big.add_submodule(name, BlockNorm(order, n, eps))
    with big.graph.inserting_after(node):
        replacement = big.graph.call_module(name, (source, weight, bias))
    node.replace_all_uses_with(replacement)
    alias(big, replacement, node.name)
    big.graph.erase_node(node)
    return index + 1


# -- fixed channel permutations (channel shuffle) ------------------------------------------------

def _rewrite_permutations(big: torch.fx.GraphModule, groups: GroupSet, n: int, widths: dict[int, int],
                          widened: set[int]) -> None:
    """Replace each reshape/transpose chain that permutes a channel dim by one ``index_select``.

    A channel shuffle (``view`` into (groups, C/groups), ``transpose``, ``view`` back) is a fixed
    permutation of the teacher's channels. Run unchanged on the big student it would permute all
    teachers' channels together; the gather computes, per teacher, exactly the teacher's
    permutation in the big layout.
    """
    nodes = dict(groups.layout.nodes)
    changed = False
    for node in list(big.graph.nodes):
        out = nodes.get(node.name)
        if out is None or any(d is None for d in out) or not node.args:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or not _in_joint_block(nodes.get(source.name)) \
                or source.name not in groups.layout.permuted_nodes:
            continue
        start = source
        while _in_joint_block(nodes.get(start.name)):
            if not start.args or not isinstance(start.args[0], torch.fx.Node):
                raise LayoutError(f"cannot trace the channel permutation ending at {node.name} back to its input")
            start = start.args[0]
        before = nodes.get(start.name)
        if before is None or any(d is None for d in before) or len(before) != len(out):
            raise LayoutError(f"the reshape chain from {start.name} to {node.name} changes the tensor's rank; "
                              "only fixed channel permutations are supported")
        moved = [d for d in range(len(out)) if not (np.array_equal(out[d].group, before[d].group)
                                                    and np.array_equal(out[d].channel, before[d].channel))]
        if len(moved) != 1:
            raise LayoutError(f"the reshape chain from {start.name} to {node.name} mixes several dims")
        dim = moved[0]
        order = _big_permutation(before[dim], out[dim], n, widths, widened)
        buffer = f"graphmerge_permutation_{node.name}"
        big.register_buffer(buffer, torch.as_tensor(order, dtype=torch.long), persistent=False)
        with big.graph.inserting_before(node.next):
            index = big.graph.get_attr(buffer)
            gathered = big.graph.call_function(torch.ops.aten.index_select.default, (start, dim, index))
        node.replace_all_uses_with(gathered)
        alias(big, gathered, node.name)
        nodes[gathered.name] = out
        changed = True
    if changed:
        big.graph.eliminate_dead_code()


def _in_joint_block(dims: list[DimLayout | None] | None) -> bool:
    return dims is not None and any(d is None for d in dims)


def _big_permutation(source: DimLayout, target: DimLayout, n: int, widths: dict[int, int],
                     widened: set[int]) -> np.ndarray:
    """For each big position of ``target``, the big position of ``source`` holding the same channel."""
    where: dict[tuple[int, int], list[int]] = {}
    for p, key in enumerate(zip(source.group.tolist(), source.channel.tolist(), strict=True)):
        where.setdefault(key, []).append(p)
    taken: dict[tuple[int, int], int] = {}
    teacher_source = np.empty(len(target.group), np.int64)
    for q, key in enumerate(zip(target.group.tolist(), target.channel.tolist(), strict=True)):
        if key[0] < 0 or key not in where:
            raise LayoutError("a channel permutation moves positions that are not channels")
        k = taken.get(key, 0)
        teacher_source[q] = where[key][k % len(where[key])]
        taken[key] = k + 1
    size, source_maps = teacher_maps(source, n, widths, widened)
    _, target_maps = teacher_maps(target, n, widths, widened)
    order = np.empty(size, np.int64)
    for t in range(n):
        order[target_maps[t]] = source_maps[t][teacher_source]
    return order

"""Widen: N teachers of one architecture become one big student that computes their mean.

Every parameter and buffer is built by scattering each teacher's tensor into its block along
every widened dimension (``graphmerge.passes.layout``); off-diagonal blocks start at zero and train.
Positions all teachers share (image channels, logits) receive every teacher: shared inputs
stack the teachers' filters, and a layer writing a shared output gets each teacher's weight
divided by N and the mean bias, so the big student averages the teachers.

The graph itself is the teachers' traced graph. Widen knows no op: each node's rule
(``graphmerge.passes.registry.OpRule``) rewrites it where running it unchanged would not compute the
teachers' mean (``plan_widen`` claims parameters stacked per teacher before the tensors are built,
``widen`` rewrites the call: a LayerNorm or softmax over a widened dim runs per teacher block) and
rewrites its literal sizes (``rewrite``: view shapes, split sizes, slice bounds). What is left here is
structural: a fixed permutation of a reshaped channel block (a channel shuffle) becomes one gather,
and graph outputs of averaged groups become the mean of the teachers' blocks.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx
from graphmerge.passes.ir import DimLayout, GroupSet, WidenInfo, attach_widen_info
from graphmerge.passes.layout import LayoutError, shared_mask, teacher_maps
from graphmerge.passes.registry import SizeContext, describe, rule_of_node
from graphmerge.passes.stream import first_divergence
from graphmerge.passes.util import getattr_path
from graphmerge.passes.widen_context import WidenContext
from torch import nn


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
    ctx = WidenContext(big, layout, n, widths, widened)
    _each_rule(big, lambda rule, node: rule.plan_widen(node, ctx))
    built: dict[str, torch.Tensor] = {}
    for name, canonical in tied_names(groups).items():
        if canonical not in built:
            dims = layout.params.get(canonical)
            tensors = [_teacher_tensor(t, s, canonical, constants[canonical]) for t, s in zip(teachers, states,
                                                                                             strict=True)]
            if canonical in ctx.stacked:
                new = torch.stack(tensors)
            else:
                new = _scatter(tensors, dims, layout.out_dims.get(canonical), n, widths, widened, canonical)
            current = getattr_path(big, canonical)
            built[canonical] = nn.Parameter(new, requires_grad=current.requires_grad) \
                if isinstance(current, nn.Parameter) else new
        set_tensor(big, name, built[canonical])
    _each_rule(big, lambda rule, node: rule.widen(node, ctx))
    rewrite_aten_sizes(big, groups, lambda dim: teacher_maps(dim, n, widths, widened)[0], widened, ctx.aliases)
    _rewrite_permutations(big, groups, n, widths, widened)
    _average_outputs(big, groups, n, widths, widened, ctx.aliases)
    big.recompile()
    # tensors the graph never reads (an aux classifier skipped in eval mode) come back per teacher
    unread = {name for name, canonical in tied_names(groups).items() if canonical not in _read_names(groups)}
    untraced = [{k: v.clone() for k, v in s.items() if k not in traced_names or k in unread} for s in states]
    start = {k: v.clone() for k, v in big.state_dict().items() if _is_counter(v)}
    counters = [{k: s[k].clone() for k in start if k in s} for s in states]
    attach_widen_info(big, WidenInfo(
        groups, n, copy_structure(teachers[0]), untraced, counters, start, tied_heads=list(ctx.tied_heads),
        stacked_params={param: sorted({g for dim in dims for g in dim.group[dim.group >= 0].tolist()})
                        for param, dims in ctx.stacked.items()}))
    return big


def _each_rule(big: torch.fx.GraphModule, hook: Callable[[Any, torch.fx.Node], None]) -> None:
    """Call ``hook(rule, node)`` for every call node of ``big`` that has a rule, in graph order (the
    nodes a hook adds are not visited)."""
    for node in list(big.graph.nodes):
        rule = rule_of_node(node, big)
        if rule is not None:
            hook(rule, node)


def _average_outputs(big: torch.fx.GraphModule, groups: GroupSet, n: int, widths: dict[int, int],
                     widened: set[int], aliases: dict[str, str]) -> None:
    """Graph outputs holding an averaged group (``Group.averaged``) leave the big student as the
    mean of the teachers' blocks, taken after the non-linear ops that follow the last layer. An
    output a rule's widen hook replaced (a final LayerNorm run per teacher block) is found through
    ``aliases``, the analysed node it stands for."""
    averaged = [g.id for g in groups if g.averaged]
    if not averaged:
        return
    output = next(node for node in big.graph.nodes if node.op == "output")
    index = 0

    def average(value: Any) -> Any:
        nonlocal index
        dims = groups.layout.nodes.get(aliases.get(value.name, value.name)) if isinstance(value, torch.fx.Node) \
            else None
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


# -- literal sizes in the graph ------------------------------------------------------------------

def rewrite_aten_sizes(gm: torch.fx.GraphModule, groups: GroupSet, size_of: Callable[[DimLayout], int],
                       widened: set[int], aliases: dict[str, str] | None = None) -> None:
    """Let every op's rule rewrite its literal arguments (``registry.OpRule.rewrite``). ``aliases`` maps
    a node widen's hooks made to the analysed node it stands for (``WidenContext.aliases``)."""
    layout = groups.layout
    widened_list = list(widened)
    aliases = aliases or {}

    def is_widened(dim: DimLayout) -> bool:
        return bool(np.isin(dim.group, widened_list).any())

    for node in list(gm.graph.nodes):
        rule = rule_of_node(node, gm)
        if rule is None:
            continue
        source = node.args[0] if node.args else None
        input_dims = layout.nodes.get(aliases.get(source.name, source.name)) \
            if isinstance(source, torch.fx.Node) else None
        rule.rewrite(node, SizeContext(layout.nodes.get(node.name), input_dims, size_of, is_widened))


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

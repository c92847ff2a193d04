"""The torch.export front end: turn an ``nn.Module`` into a plain ATen-level ``torch.fx.GraphModule``.

``capture`` runs ``torch.export.export(model, args, kwargs, strict=False)`` with the model in eval
mode and without gradients, and returns a plain ``torch.fx.GraphModule`` built from the unlifted
module (``ep.module()``), so that ``.train()``/``.eval()``, ``state_dict()`` and pickling behave as
for any module. What the later passes can rely on:

* **Graph.** Nodes are ATen ops of torch.export's pre-dispatch ("training") IR, e.g.
  ``aten.conv2d.default``, ``aten.linear.default``, ``aten.layer_norm.default``,
  ``aten.scaled_dot_product_attention.default``, ``aten.view.default``, plus ``operator.getitem`` for
  ops with several outputs (``aten.split``/``chunk``/``unbind``) and ``aten.sym_size.int`` for sizes
  read from a dynamic dimension. ``aten._assert_tensor_metadata`` checks and the ``_guards_fn`` input
  check that ``ep.module()`` inserts are removed (a plain GraphModule does not check its inputs).
* **State.** Every parameter and buffer is a ``get_attr`` node whose target is its ``state_dict``
  name in the original model (``layer1.0.conv1.weight``); non-persistent buffers stay
  non-persistent; tensor constants created in ``forward`` (``torch.tensor([...])``) are buffers named
  ``lifted_tensor_N`` (read through ``aten.lift_fresh_copy``). So ``gm.state_dict()`` holds every key
  of ``model.state_dict()`` plus the ``lifted_tensor_N`` constants. Tied parameters keep all their
  names. The tensors are SHARED with the model, as with ``torch.fx.symbolic_trace``: a train-mode
  forward of the GraphModule updates the model's BatchNorm statistics too.
* **Inputs and outputs.** The graph's placeholders are the flat leaves of ``(args, kwargs)``: the
  positional inputs in order, then the keyword inputs in the order they were given (non-tensor
  leaves such as a ``bool`` kwarg get a placeholder that nothing reads; ``None`` has no leaf). The
  output node's single argument is the flat tuple of output leaves in ``torch.utils._pytree`` order
  (dict keys in insertion order, ``ModelOutput`` fields in order; non-tensor leaves are literal
  constants). The graph's pytree codegen re-nests both, so ``gm(*args, **kwargs)`` takes and returns
  the same structures as ``model(*args, **kwargs)``. Dataclasses in the inputs or outputs are
  registered as pytree nodes (``torch.utils._pytree.register_dataclass``) on first sight.
* **Caches.** Hugging Face models return a ``DynamicCache``, which is not a pytree. When ``forward``
  has a ``use_cache`` parameter that the caller did not set and the model's ``config.use_cache`` is
  true, ``use_cache=False`` is passed during capture and is NOT an input of the GraphModule: call it
  with the same arguments as the model; its output is the model's output without the cache.
* **Modes.** ``aten.batch_norm``, ``aten.instance_norm``, the dropout family and ``aten.rrelu`` take
  the training flag as a constant; each is replaced by a ``call_module`` to a stateless module from
  ``mode_ops.py`` (``ModeBatchNorm``, ``ModeInstanceNorm``, ``ModeOp``) with the SAME positional arguments
  as the ATen op (the module's ``aten_op`` names it) that reads its own ``self.training`` instead, so
  ``gm.train()``/``gm.eval()`` switch behaviour; in train mode BatchNorm updates running statistics
  and ``num_batches_tracked`` exactly like ``nn.BatchNorm`` (passed as the ``num_batches_tracked=``
  kwarg). Each one starts in the training mode of the module that owned the op. Limitation: a
  dropout probability that the model computes as ``p if self.training else 0.0`` (Hugging Face and
  timm attention, ``nn.MultiheadAttention``; SDPA's ``dropout_p``) is captured as 0.0 and stays 0.0.
* **Shapes and sources.** Every ``call_function`` node has ``meta['val']`` (FakeTensor, tuple of
  them, or SymInt); ``node_shape``/``node_shapes`` give concrete int shapes (symbolic sizes replaced
  by their example value). ``meta['stack_trace']`` keeps every model frame (torch.export keeps only
  frames named ``forward``; here helper functions such as ``_forward_impl`` are kept too) and
  ``source_line`` picks the user's line from it.
* **Dynamic batch.** With ``dynamic_batch=True`` dim 0 of every tensor input is
  ``torch.export.Dim.AUTO``, so the GraphModule runs on other batch sizes (including 1). If export
  fails that way it is retried with static shapes, with a ``CaptureWarning``; a warning is also given
  when export had to specialise the batch of an input (e.g. an example batch of 1).

Export failures are re-raised as one-paragraph ``TraceError`` naming torch's reason, the user's source
line and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import re
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from graphmerge.passes.errors import TraceError
from graphmerge.passes.mode_ops import ModeBatchNorm, ModeInstanceNorm, ModeOp, make_mode_switchable
from graphmerge.passes.util import one_line
from torch import nn

__all__ = ["CaptureWarning", "ModeBatchNorm", "ModeInstanceNorm", "ModeOp", "capture", "node_shape",
           "node_shapes", "source_line"]

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_THIS_FILE = os.path.abspath(__file__)


class CaptureWarning(UserWarning):
    """Capture succeeded but not as asked (static batch instead of dynamic)."""


def capture(model: nn.Module, example_inputs: tuple | torch.Tensor, example_kwargs: dict | None = None, *,
            dynamic_batch: bool = True) -> torch.fx.GraphModule:
    """Export ``model`` with torch.export (non-strict) and return a plain, mode-switchable GraphModule.

    The model is exported in eval mode under ``torch.no_grad()`` (no autograd-only ``alias`` ops, and
    ``@torch.no_grad`` helpers such as rotary embeddings need no grad-mode wrapper); every
    submodule's training flag is restored afterwards and the returned GraphModule starts in the
    model's modes. See the module docstring for the contract.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    args = tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    model_name = type(model).__name__
    injected = _cache_kwargs(model, args, kwargs)
    kwargs.update(injected)
    _register_dataclasses((args, kwargs))
    flags = {name: m.training for name, m in model.named_modules(remove_duplicate=False)}
    with _eval_mode(model), torch.no_grad(), _full_stack_traces(), _registering_outputs(model):
        try:
            with _graph_capture_paths():
                ep, dynamic = _export(model, args, kwargs, dynamic_batch, model_name)
        except TraceError:
            # Some capture paths do not export (Hugging Face Swin builds a tensor from its window
            # size under is_tracing, and SDPA's is_causal then depends on its value): the model's
            # own eval path is the graph then. A parameter cache it bakes in fails the certificate.
            ep, dynamic = _export(model, args, kwargs, dynamic_batch, model_name)
        unlifted = ep.module()
    gm = torch.fx.GraphModule(unlifted, unlifted.graph, re.sub(r"\W", "_", model_name))
    _drop_checks(gm)
    _drop_inputs(gm, set(injected))
    _add_missing_state(gm, model)
    make_mode_switchable(gm, model, flags)
    gm.graph.lint()
    gm.recompile()
    gm.training = model.training
    if dynamic:
        _warn_static_batch(gm, model_name)
    return gm


# --- export --------------------------------------------------------------------------------

def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool,
            model_name: str) -> tuple[torch.export.ExportedProgram, bool]:
    """The exported program, and whether its batch dimension was exported as dynamic."""
    if dynamic_batch:
        try:
            return torch.export.export(model, args, kwargs, dynamic_shapes=_batch_shapes(model, args, kwargs),
                                       strict=False), True
        except Exception as exc:
            if not _retry_static(exc):
                raise TraceError(_export_failure_message(exc, model, model_name)) from exc
            reason = one_line(exc, 300, first=True)
        warnings.warn(f"model {model_name!r} cannot be exported with a dynamic batch dimension ({reason}); "
                      f"captured with static shapes, so the graph only runs on the example batch size.",
                      CaptureWarning, stacklevel=3)
    try:
        return torch.export.export(model, args, kwargs, strict=False), False
    except Exception as exc:
        raise TraceError(_export_failure_message(exc, model, model_name)) from exc


def _batch_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``{0: Dim.AUTO}`` for every tensor input with a dim 0, keyed by parameter name."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return {0: torch.export.Dim.AUTO}
        return None

    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


def _retry_static(exc: BaseException) -> bool:
    """Whether a static-shape export might succeed where the dynamic one failed."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return not (isinstance(exc, (GuardOnDataDependentSymNode, TraceError)) or _unknown_output_type(exc))


def _cache_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``{'use_cache': False}`` when the model would otherwise return a (non-pytree) KV cache.

    The rule: ``forward`` has a ``use_cache`` parameter, the caller set it neither by keyword nor
    by position, and the model's ``config.use_cache`` is true (Hugging Face resolves ``None`` from
    it). A caller who passes ``use_cache=True`` gets a TraceError naming the cache type.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    names = [p.name for p in params]
    if "use_cache" not in names or "use_cache" in kwargs:
        return {}
    param = params[names.index("use_cache")]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if param in positional and positional.index(param) < len(args):
        return {}
    config = getattr(model, "config", None)
    default = param.default if param.default is not param.empty else None
    wants_cache = getattr(config, "use_cache", None) if default is None else default
    return {"use_cache": False} if wants_cache else {}


# --- pytree registration of dataclasses ----------------------------------------------------

def _register_dataclasses(tree: Any) -> None:
    """Register every unregistered dataclass instance type in ``tree`` as a pytree node."""
    seen: set[int] = set()

    def visit(x: Any) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        cls = type(x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type) and cls not in pytree.SUPPORTED_NODES:
            with contextlib.suppress(Exception):  # e.g. registered concurrently
                pytree.register_dataclass(cls)
        if cls in pytree.SUPPORTED_NODES:
            children, _ = pytree.SUPPORTED_NODES[cls].flatten_fn(x)
            for child in children:
                visit(child)

    visit(tree)


@contextlib.contextmanager
def _registering_outputs(model: nn.Module) -> Iterator[None]:
    """Wrap ``model.forward`` for the export so dataclass outputs are registered before export
    flattens them (their type is only known once the model has run)."""
    had_own = "forward" in model.__dict__
    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        _register_dataclasses(out)
        return out

    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = original
        else:
            del model.forward


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode for the duration, then each one's own flag restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


# --- code paths written for graph capture ----------------------------------------------------

@contextlib.contextmanager
def _graph_capture_paths() -> Iterator[None]:
    """Make ``torch.jit.is_tracing()`` true while exporting.

    Model code takes a different path when it is being captured: eval-mode caches of tensors
    computed from parameters (timm's LeViT and EfficientFormer cache ``attention_biases[:, idx]``
    in a dict unless ``torch.jit.is_tracing() or self.training``) would otherwise be baked into
    the graph as constants, so every teacher would read teacher 0's biases. The capture path
    computes them from the parameters, which is what the analysis must see. Where the capture
    path itself cannot be exported, ``capture`` exports the eval path instead.
    """
    jit = torch.jit
    original = jit.is_tracing
    jit.is_tracing = lambda: True
    try:
        yield
    finally:
        jit.is_tracing = original


# --- stack traces ----------------------------------------------------------------------------

@contextlib.contextmanager
def _full_stack_traces() -> Iterator[None]:
    """Keep every model frame in ``node.meta['stack_trace']``, not just those named ``forward``.

    torch.export's tracer keeps only frames named ``forward``, so an op in a helper (torchvision's
    ``_forward_impl``, a Hugging Face attention function) is attributed to the call of the helper.
    While exporting, frames after the first ``forward`` that lie outside torch (and outside this file)
    are kept too. If torch's hook is missing (another torch version) nothing is patched.
    """
    base = getattr(torch.fx.proxy, "TracerBase", None)
    original = getattr(base, "_filter_traceback_frames", None)
    if original is None:
        yield
        return

    def filter_frames(self: Any, summary: traceback.StackSummary) -> traceback.StackSummary:
        if not getattr(self, "_record_forward_stack_traces_only", False):
            return original(self, summary)
        try:
            from torch.fx.experimental.symbolic_shapes import uninteresting_files
            skip = uninteresting_files()
        except Exception:  # pragma: no cover - torch internals moved
            skip = set()
        frames, started = [], False
        for frame in summary:
            started = started or frame.name == "forward"
            if not started or frame.filename in skip or os.path.abspath(frame.filename) == _THIS_FILE:
                continue
            if frame.name == "forward" or _is_user_file(frame.filename):
                frames.append(frame)
        return traceback.StackSummary.from_list(frames)

    base._filter_traceback_frames = filter_frames
    try:
        yield
    finally:
        base._filter_traceback_frames = original


def _is_user_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    return not (filename.startswith("<") or path.startswith(_TORCH_DIR) or path == _THIS_FILE)


_FRAME_RE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>[^\n]*)\n(?P<code>[^\n]*)')
_LIBRARY_INTERNALS = re.compile(r"[/\\]transformers[/\\](?!models[/\\])")


def source_line(node: torch.fx.Node) -> str | None:
    """``"file.py:LINE in fn: code"`` for the last model frame that created ``node``.

    Frames inside torch are skipped; so are Hugging Face transformers' shared internals (attention
    integrations, masking utilities) when a frame of the model's own code (``transformers/models/``
    or outside transformers) is available.
    """
    frames = [(m["file"], m["line"], m["fn"].strip(), m["code"].strip())
              for m in _FRAME_RE.finditer(node.meta.get("stack_trace") or "")
              if _is_user_file(m["file"])]
    preferred = [f for f in frames if not _LIBRARY_INTERNALS.search(os.path.abspath(f[0]))]
    if not (preferred or frames):
        return None
    file, line, fn, code = (preferred or frames)[-1]
    return f"{file}:{line} in {fn}: {code}" if code else f"{file}:{line} in {fn}"


# --- shapes ------------------------------------------------------------------------------------

def _hint(size: Any) -> int:
    """A concrete int for a (possibly symbolic) size: its example value, or -1 if it has none."""
    if isinstance(size, int):
        return size
    with contextlib.suppress(Exception):
        hint = size.node.hint
        if hint is not None:
            return int(hint)
    with contextlib.suppress(Exception):
        from torch.fx.experimental.symbolic_shapes import optimization_hint
        return int(optimization_hint(size))
    with contextlib.suppress(Exception):
        return int(size)
    return -1


def _shape_of(val: Any) -> tuple[int, ...] | None:
    if isinstance(val, torch.Tensor):
        return tuple(_hint(s) for s in val.shape)
    return None


def node_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The concrete shape of the tensor ``node`` produces, or None if it is not one tensor."""
    return _shape_of(node.meta.get("val"))


def node_shapes(node: torch.fx.Node) -> tuple[tuple[int, ...] | None, ...]:
    """The concrete shape of every output of ``node`` (one entry per tuple element; None for a
    non-tensor); a single tensor gives a 1-tuple, a node without a value ``()``."""
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return tuple(_shape_of(v) for v in val)
    if val is None:
        return ()
    return (_shape_of(val),)


# --- cleaning the unlifted graph -----------------------------------------------------------

_CHECK_OPS = {"aten::_assert_tensor_metadata", "aten::_assert_scalar", "aten::sym_constrain_range_for_size",
              "aten::_assert_async"}


def _drop_checks(gm: torch.fx.GraphModule) -> None:
    """Remove the input guard module and export's metadata asserts (both have no users)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.users:
            continue
        is_guard = node.op == "call_module" and node.target == "_guards_fn"
        is_check = node.op == "call_function" and getattr(node.target, "name", lambda: "")() in _CHECK_OPS
        if is_guard or is_check:
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")


def _drop_inputs(gm: torch.fx.GraphModule, names: set[str]) -> None:
    """Remove the keyword inputs ``names`` (injected by capture) from the graph and its pytree spec."""
    if not names:
        return
    graph = gm.graph
    info = graph._codegen.pytree_info
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    args, kwargs = pytree.tree_unflatten(placeholders, info.in_spec)
    for name in names:
        node = kwargs.pop(name)
        if node.users:  # pragma: no cover - export specialises constant inputs
            raise TraceError(f"internal: injected input {name!r} is used by the graph")
        graph.erase_node(node)
    in_spec = pytree.tree_structure((args, kwargs))
    orig_args = [a for a in info.orig_args if a not in names]
    graph._codegen.pytree_info = info._replace(orig_args=orig_args, in_spec=in_spec)


def _add_missing_state(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """Register state_dict entries of the model that the graph does not read (e.g. the second name
    of a tied parameter), sharing the model's tensors, so every state_dict key is there."""
    have = set(gm.state_dict(keep_vars=True))
    for name, value in model.state_dict(keep_vars=True).items():
        if name in have:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = _ensure_module(gm, owner_name)
        if isinstance(value, nn.Parameter):
            owner.register_parameter(attr, value)
        else:
            owner.register_buffer(attr, value)


def _ensure_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in filter(None, path.split(".")):
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module


def _warn_static_batch(gm: torch.fx.GraphModule, model_name: str) -> None:
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    static = [n.name for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
              and n.meta["val"].dim() > 0 and is_concrete_int(n.meta["val"].shape[0])]
    if static:
        warnings.warn(f"model {model_name!r}: torch.export specialised the batch dimension of input(s) "
                      f"{', '.join(static)} to the example's size, so the graph only runs on that batch size "
                      f"(an example batch of 1 always specialises: give at least 2 examples).",
                      CaptureWarning, stacklevel=3)


# --- errors ------------------------------------------------------------------------------------

def _unknown_output_type(exc: BaseException) -> str | None:
    match = re.search(r"Found <class '([^']+)'> in output, which is not a known type", str(exc))
    return match[1] if match else None


_RAISED_AT_RE = re.compile(r'The following call raised this error:\s*\n\s*File "(?P<file>[^"]+)", line (?P<line>\d+), '
                           r'in [^\n]*\n\s*(?P<code>[^\n]*)')


def _user_location(exc: BaseException) -> str | None:
    """``file:line `code``` of the deepest model frame in the traceback, or where torch says it broke."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if _is_user_file(frame.filename):
            found = (frame.filename, frame.lineno, (frame.line or "").strip())
    if found is None:
        match = _RAISED_AT_RE.search(str(exc))
        if match and _is_user_file(match["file"]):
            found = (match["file"], int(match["line"]), match["code"].strip())
    if found is None:
        return None
    file, line, code = found
    return f"{file}:{line} `{code}`" if code else f"{file}:{line}"


def _export_failure_message(exc: BaseException, model: nn.Module, model_name: str) -> str:
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    where = _user_location(exc)
    at = f" at {where}" if where else ""
    unknown = _unknown_output_type(exc)
    if unknown is not None:
        fix = (f"Return tensors, tuples, lists, dicts or dataclasses instead, or register {unknown} as a pytree node "
               f"(torch.utils._pytree.register_pytree_node); for a Hugging Face model that returns a cache, pass "
               f"use_cache=False.")
        cause = f"it returns a {unknown}, which torch.export cannot flatten into tensors"
    elif isinstance(exc, GuardOnDataDependentSymNode) or "data-dependent" in str(exc):
        fix = ("Python control flow or a Python number there depends on a tensor's value: make that value a tensor op "
               "(e.g. torch.where instead of `if`), pass it as a non-tensor keyword argument, or report the model.")
        cause = one_line(exc, 300, first=True)
    else:
        fix = ("Make the code there traceable (tensor ops instead of Python values computed from tensors), pass "
               "non-tensor settings as keyword arguments, or report the model with this message.")
        cause = one_line(exc, 300, first=True)
    return f"torch.export cannot capture model {model_name!r}{at}: {cause}. {fix}"

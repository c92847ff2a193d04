"""The front end: turn an ``nn.Module`` into a shape-annotated ``torch.fx.GraphModule``.

Every later pass reads two things this pass provides: the graph of ops (from
``torch.fx.symbolic_trace``) and the shape of every tensor in it (from ``ShapeProp``, stored as
``node.meta['tensor_meta']``); the coupling analysis needs shapes to tell a channel dimension
from a spatial one. Nodes also carry ``node.stack_trace`` so a later pass can name the source
line of an op it does not understand.

When torch.fx cannot trace a model, its own error names a frame inside torch.fx; users need the
line of THEIR code that broke tracing and what to do about it, so both failures (tracing and
running the example input) are re-raised as one-paragraph ``graphmerge.errors.TraceError``.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import os
import re
import sys
import traceback
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import torch
import torch.fx
from graphmerge.passes.errors import TraceError
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["trace"]

LeafSpec = str | type

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_THIS_FILE = os.path.abspath(__file__)
_TRACER_TRACE_CODE = torch.fx.Tracer.trace.__code__
_FIX_IN_SUBMODULE = (
    "To fix it, mark that submodule a leaf so it is kept as one opaque call (`--leaf {name}` on "
    "the command line, `leaf_modules=['{name}']` in Python), pass `concrete_args` to fix the value "
    "the code depends on, or rewrite the data-dependent control flow with tensor ops (e.g. "
    "torch.where)."
)
_FIX_IN_ROOT = (
    "To fix it, pass `concrete_args` to fix the value the code depends on, rewrite the "
    "data-dependent control flow with tensor ops (e.g. torch.where), or move that code into a "
    "submodule and mark it a leaf (`--leaf NAME` on the command line, `leaf_modules=` in Python)."
)


def trace(model: nn.Module, example_inputs: tuple | torch.Tensor, *,
          leaf_modules: Iterable[LeafSpec] = (), concrete_args: dict[str, Any] | None = None,
          name: str | None = None) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` and record the shape of every node on ``example_inputs``.

    ``leaf_modules`` lists submodules torch.fx should not trace into: module classes, qualified
    submodule names (``"layer1.0"``) or class names (``"BasicBlock"``). The model is traced and
    run in eval mode (the inference function that the invariants and the ONNX export are about;
    it also keeps BatchNorm running statistics untouched) without gradients; every module's
    training flag is restored afterwards. The returned GraphModule shares the model's
    submodules and parameters, as ``torch.fx.symbolic_trace`` does.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    model_name = name or type(model).__name__
    tracer = _LeafTracer(*_resolve_leaves(model, leaf_modules, model_name))
    with _eval_mode(model):
        gm = _symbolic_trace(tracer, model, concrete_args, model_name)
        _propagate_shapes(gm, _propagation_args(model, tuple(example_inputs), concrete_args),
                          model_name)
    gm.training = model.training
    return gm


class _LeafTracer(torch.fx.Tracer):
    """A Tracer that also keeps user-chosen modules as leaves, and remembers where it failed."""

    def create_node(self, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = super().create_node(*args, **kwargs)
        if not node.stack_trace:
            node.stack_trace = _user_stack()
        return node

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types)
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module is the first to see it
                with contextlib.suppress(NameError):
                    self.failed_module = self.path_of_module(m)
            raise


def _resolve_leaves(model: nn.Module, leaf_modules: Iterable[LeafSpec],
                    model_name: str) -> tuple[tuple[type, ...], frozenset[str]]:
    """Split leaf specs into classes and qualified names; a name may also be a class name."""
    submodules = dict(model.named_modules())
    class_by_name = {type(m).__name__: type(m) for m in submodules.values()}
    types: list[type] = []
    names: set[str] = set()
    for spec in leaf_modules:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            types.append(spec)
        elif isinstance(spec, str) and spec and spec in submodules:
            names.add(spec)
        elif isinstance(spec, str) and spec in class_by_name:
            types.append(class_by_name[spec])
        else:
            raise TraceError(_unknown_leaf_message(spec, submodules, class_by_name, model_name))
    return tuple(types), frozenset(names)


def _unknown_leaf_message(spec: Any, submodules: dict[str, nn.Module],
                          class_by_name: dict[str, type], model_name: str) -> str:
    candidates = [n for n in submodules if n] + sorted(class_by_name)
    close = difflib.get_close_matches(str(spec), candidates, n=5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (f"leaf module {spec!r} is neither a submodule name nor a module class of model "
            f"{model_name!r}.{hint} Give a qualified submodule name as printed by "
            f"`model.named_modules()` (e.g. 'layer1.0'), the name of a module class used in the "
            f"model, or (in Python) the class itself.")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Put every module in eval mode for the duration, then restore each one's own flag.

    Restoring per module (not ``model.train(flag)``) keeps a user's deliberately frozen
    submodules (e.g. BatchNorm left in eval inside a training model) as they were.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def _symbolic_trace(tracer: _LeafTracer, model: nn.Module, concrete_args: dict[str, Any] | None,
                    model_name: str) -> torch.fx.GraphModule:
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:
        raise TraceError(_trace_failure_message(exc, tracer.failed_module, model, model_name)) from exc
    class_name = re.sub(r"\W", "_", model_name)  # GraphModule names a class after it
    return torch.fx.GraphModule(tracer.root, graph, class_name)


def _trace_failure_message(exc: BaseException, failed_module: str | None, model: nn.Module,
                           model_name: str) -> str:
    where = _user_frame(exc.__traceback__) or _forward_location(model)
    inside = f" (inside submodule {failed_module!r})" if failed_module else ""
    fix = _FIX_IN_SUBMODULE.format(name=failed_module) if failed_module else _FIX_IN_ROOT
    return (f"torch.fx cannot trace model {model_name!r}: {_where_text(where)}{inside} failed "
            f"because {_one_line(exc)}. {fix}")


def _propagation_args(model: nn.Module, example_inputs: tuple,
                      concrete_args: dict[str, Any] | None) -> tuple:
    """The example inputs, followed by the values of the concrete arguments after them.

    torch.fx keeps a placeholder for every concrete argument and asserts at run time that it
    receives the value it was specialised to, so propagation must pass those values too.
    """
    if not concrete_args:
        return example_inputs
    positional = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extra = []
    for param in positional[len(example_inputs):]:
        if param.name in concrete_args:
            extra.append(concrete_args[param.name])
        elif param.default is not param.empty:
            extra.append(param.default)
        else:
            break
    return example_inputs + tuple(extra)


def _propagate_shapes(gm: torch.fx.GraphModule, example_inputs: tuple, model_name: str) -> None:
    """Run ShapeProp; on failure, name the node, its source line and the input shapes given.

    ShapeProp prints a traceback to stderr before re-raising; that is noise next to our
    one-paragraph error, so stderr is captured and only replayed when propagation succeeds
    (it may hold the model's own warnings).
    """
    prop = _RecordingShapeProp(gm)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            prop.propagate(*example_inputs)
    except Exception as exc:
        raise TraceError(_shape_failure_message(exc, prop.current, example_inputs, model_name)) from exc
    sys.stderr.write(captured.getvalue())


class _RecordingShapeProp(ShapeProp):
    """ShapeProp that remembers which node it is running, to name it when the model fails."""

    current: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _shape_failure_message(exc: BaseException, node: torch.fx.Node | None, example_inputs: tuple,
                           model_name: str) -> str:
    cause = exc.__cause__ or exc  # ShapeProp wraps the model's exception in a RuntimeError
    where = _user_frame(cause.__traceback__) or _stack_trace_location(node)
    node_text = f" at node {node.name!r} ({node.op} {_target_name(node)})" if node is not None else ""
    source = f", {_where_text(where)}" if where else ""
    return (f"model {model_name!r} was traced but fails on its example input "
            f"{_describe_inputs(example_inputs)}{node_text}{source}: {_one_line(cause)}. "
            f"Give an input the model accepts: `--input-shape N,C,H,W` on the command line "
            f"(e.g. --input-shape 1,3,224,224), an `example_inputs()` function in the model file, "
            f"or matching `example_inputs` in Python.")


# --- locating the user's source line -------------------------------------------------------

Location = tuple[str, int, str]  # (file, line, code)


def _user_stack() -> str:
    """The model's source frames (outermost first) between ``Tracer.trace`` and this call.

    torch.fx can record this itself (``record_stack_traces``), but symbolising its traceback
    imports torch._inductor, which costs seconds on every run; Python's frames are enough here.
    """
    frames = []
    for frame, lineno in traceback.walk_stack(None):
        if frame.f_code is _TRACER_TRACE_CODE:
            break
        if _is_user_file(frame.f_code.co_filename):
            frames.append(traceback.FrameSummary(frame.f_code.co_filename, lineno,
                                                 frame.f_code.co_name))
    return "".join(traceback.format_list(frames[::-1])).rstrip()


def _is_user_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    return not (filename.startswith("<") or path.startswith(_TORCH_DIR) or path == _THIS_FILE)


def _user_frame(tb: TracebackType | None) -> Location | None:
    """The deepest frame of a traceback that is not inside torch (nor this pass)."""
    found = None
    for frame in traceback.extract_tb(tb):
        if _is_user_file(frame.filename):
            found = (frame.filename, frame.lineno or 0, (frame.line or "").strip())
    return found


_FRAME_RE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in [^\n]*\n\s*(?P<code>[^\n]*)')


def _stack_trace_location(node: torch.fx.Node | None) -> Location | None:
    """The deepest user frame of the source stack torch.fx recorded when it created ``node``."""
    if node is None or not node.stack_trace:
        return None
    found = None
    for match in _FRAME_RE.finditer(node.stack_trace):
        if _is_user_file(match["file"]):
            found = (match["file"], int(match["line"]), match["code"].strip())
    return found


def _forward_location(model: nn.Module) -> Location | None:
    try:
        lines, lineno = inspect.getsourcelines(type(model).forward)
        return (inspect.getsourcefile(type(model).forward) or "?", lineno, lines[0].strip())
    except (OSError, TypeError):
        return None


def _where_text(where: Location | None) -> str:
    if where is None:
        return "its forward"
    file, line, code = where
    return f"{file}:{line} `{code}`" if code else f"{file}:{line}"


# --- small formatting helpers --------------------------------------------------------------

def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.rstrip(".")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def _describe_inputs(example_inputs: Sequence[Any]) -> str:
    parts = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            parts.append(f"shape {tuple(x.shape)} ({str(x.dtype).removeprefix('torch.')})")
        else:
            parts.append(type(x).__name__)
    return "[" + ", ".join(parts) + "]" if parts else "(no inputs)"


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))

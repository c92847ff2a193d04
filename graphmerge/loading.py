"""Turn a model *spec* from the command line into a model and an example input.

Specs:

- ``path/to/model.py``: the file's one candidate: a function named ``build_model``,
  ``get_model``, ``create_model`` or ``model``; failing that, the only ``nn.Module`` subclass
  defined in the file whose constructor needs no argument.
- ``path/to/model.py:NAME``: ``NAME`` is a factory returning an ``nn.Module``, an ``nn.Module``
  class, or a module instance.
- ``torchvision:NAME``: a torchvision model with random weights (nothing is downloaded).
- ``examples:NAME``: a model bundled in ``graphmerge/examples``.
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)`` (random weights, nothing downloaded).
- ``hf:PATH``: a Hugging Face transformers model saved in the local directory ``PATH`` by
  ``model.save_pretrained(PATH)`` (``config.json`` plus the weights); built as the class named in
  ``config.architectures[0]`` (``AutoModel`` when the config names none) and loaded in eval mode
  with ``local_files_only=True``, with SDPA attention (eager where the class has no SDPA).

The example input comes from ``--input-shape`` when given, else from an ``example_inputs()``
function in the model's file, else from a per-model default for torchvision classifiers, the
model's ``pretrained_cfg["input_size"]`` for timm (batch 2), and the config for hf (below).
Every mistake becomes a one-paragraph ``GraphMergeError`` naming the cause and the fix.

Calling convention: ``loaded.model(*loaded.example_inputs, **loaded.example_kwargs)`` runs the
model. ``example_kwargs`` is empty except for hf models, which get:

- the main input positionally in ``example_inputs``: ``input_ids`` (batch 2, sequence 8, random
  ints below ``vocab_size``) for text models, ``pixel_values`` (2, num_channels, image_size,
  image_size) for vision models (a ``model_type`` in ``HF_VISION_MODEL_TYPES``, or a config with
  ``image_size`` and ``num_channels``). If ``forward``'s first parameter is not that input, it
  goes into ``example_kwargs`` instead and ``example_inputs`` is empty. (Positional, so that a
  caller passing only ``example_inputs`` still feeds the model.) ``--input-shape`` sets the shape
  of that main input.
- ``attention_mask`` (ones, the shape of ``input_ids``) for text models whose ``forward``
  takes one.
- ``use_cache=False`` when ``forward`` takes ``use_cache``: causal LMs ship with
  ``config.use_cache=True``, and a forward that builds a KV cache returns a ``DynamicCache``
  object, which graph capture cannot return (``torch.export`` fails on it: "not a known type";
  with ``use_cache=False`` it exports). Passing the flag per call leaves the model's config, and
  so a saved merged model, unchanged. Capture steps should pass ``example_kwargs`` through.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import itertools
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from graphmerge.errors import GraphMergeError
from graphmerge.passes.util import one_line

__all__ = ["LoadedModel", "default_input_shape", "example_names", "load_model", "parse_input_shape"]

FACTORY_NAMES = ("build_model", "get_model", "create_model", "model")
EXAMPLES_DIR = Path(__file__).parent / "examples"

# Batch 2 so the batch dimension is never a size-1 dimension that broadcasting could confuse
# with a per-channel one; 64 px so stride-32 stages still have 2x2 maps (no size-1 spatial dims
# either) while running fast. Parameter shapes do not depend on the image size, so neither do
# the coupling groups. The models below cannot run at 64 px and get their native size.
DEFAULT_IMAGE_SHAPE = (2, 3, 64, 64)
NATIVE_IMAGE_SIZE = {
    "inception_v3": 299,  # its stem needs at least 75 px; 299 is its documented size
    "maxvit_t": 224,  # window partitioning is fixed to a 224 px input
    "vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224,
    "vit_h_14": 224,  # the position embedding is fixed to a 224 px input
}

# HF ``model_type``s whose main input is ``pixel_values`` (configs with ``image_size`` and
# ``num_channels`` count as vision models too).
HF_VISION_MODEL_TYPES = frozenset({
    "beit", "bit", "convnext", "convnextv2", "cvt", "deit", "dinat", "dinov2", "dinov2_with_registers",
    "donut-swin", "efficientformer", "efficientnet", "focalnet", "glpn", "hiera", "levit", "mobilenet_v1",
    "mobilenet_v2", "mobilevit", "mobilevitv2", "nat", "poolformer", "pvt", "pvt_v2", "regnet", "resnet",
    "segformer", "swiftformer", "swin", "swinv2", "textnet", "van", "vit", "vit_hybrid", "vit_mae",
    "vit_msn", "yolos",
})
HF_TEXT_SEQUENCE = (2, 8)  # batch 2, sequence 8: no size-1 dimension, and fast

_module_counter = itertools.count()


@dataclass
class LoadedModel:
    """A model ready for the passes: the module, one batch of input, and where it came from.

    ``source`` is a spec that loads the same model again (``/abs/model.py:build_model``,
    ``torchvision:resnet18``, ``examples:resnet20``, ``timm:resnet18``, ``hf:/abs/dir``).
    ``model(*example_inputs, **example_kwargs)`` runs the model; ``example_kwargs`` is empty
    except for ``hf:`` models (``attention_mask``, ``use_cache=False``; see the module docstring).
    """

    model: nn.Module
    example_inputs: tuple
    name: str
    source: str
    example_kwargs: dict[str, Any] = field(default_factory=dict)


def load_model(spec: str, *, input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """Load the model a spec names, and an example input (see the module docstring)."""
    kind, target, attr = _split_spec(spec)
    if kind == "torchvision":
        return _load_torchvision(target, input_shape)
    if kind == "timm":
        return _load_timm(target, input_shape)
    if kind == "hf":
        return _load_hf(target, input_shape)
    module = _import_example(target) if kind == "examples" else _import_file(Path(target))
    origin = f"examples:{target}" if kind == "examples" else str(Path(module.__file__))
    attr, factory = _pick_factory(module, origin, attr)
    model = _build(factory, f"{origin}:{attr}")
    if input_shape is not None:
        inputs = _random_input(input_shape)
    else:
        inputs = _file_example_inputs(module, origin, f"{origin}:{attr}")
    name = target if kind == "examples" else attr if attr not in FACTORY_NAMES else type(model).__name__
    source = origin if kind == "examples" else f"{origin}:{attr}"
    return LoadedModel(model=model, example_inputs=inputs, name=name, source=source)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``"1x3x224x224"``) -> ``(1, 3, 224, 224)``."""
    parts = [p.strip() for p in re.split(r"[,x]", text.strip())]
    if not text.strip() or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise GraphMergeError(
            f"bad input shape {text!r}: expected positive integers separated by commas, the shape "
            f"of one batch including the batch size, e.g. --input-shape 1,3,224,224 (batch, "
            f"channels, height, width) or --input-shape 16,1 for a batch of 16 scalars.")
    return tuple(int(p) for p in parts)


def example_names() -> list[str]:
    """The models bundled in graphmerge/examples, usable as ``examples:NAME``."""
    return sorted(p.stem for p in EXAMPLES_DIR.glob("*.py") if not p.stem.startswith("_"))


def default_input_shape(torchvision_name: str) -> tuple[int, ...] | None:
    """The example-input shape used for a torchvision classifier, None for other models."""
    import torchvision

    if torchvision_name not in torchvision.models.list_models(module=torchvision.models):
        return None
    size = NATIVE_IMAGE_SIZE.get(torchvision_name)
    return DEFAULT_IMAGE_SHAPE if size is None else (DEFAULT_IMAGE_SHAPE[0], 3, size, size)


# --- specs ---------------------------------------------------------------------------------

def _split_spec(spec: str) -> tuple[str, str, str | None]:
    """-> (kind, target, attribute): kind is 'torchvision', 'examples', 'timm', 'hf' or 'file'."""
    for prefix in ("torchvision", "examples", "timm", "hf"):
        if spec.startswith(prefix + ":"):
            return prefix, spec[len(prefix) + 1:], None
    path, sep, attr = spec.rpartition(":")
    if sep and path.endswith(".py") and attr.isidentifier():
        return "file", path, attr
    if spec.endswith(".py"):
        return "file", spec, None
    raise GraphMergeError(
        f"unrecognised model spec {spec!r}: expected path/to/model.py, path/to/model.py:NAME "
        f"(a factory function or nn.Module class in that file), torchvision:NAME, timm:NAME, "
        f"hf:PATH (a directory written by save_pretrained) or examples:NAME (bundled: "
        f"{', '.join(example_names())}).")


# --- torchvision ---------------------------------------------------------------------------

def _import_vision_package(package: str, spec: str) -> Any:
    """torchvision or timm, or an error that says which extra installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise GraphMergeError(
            f"{spec} needs {package}, which is not installed ({exc}). Install the vision extra: "
            f"pip install -e '.[vision]'.") from exc


def _load_torchvision(name: str, input_shape: tuple[int, ...] | None) -> LoadedModel:
    torchvision = _import_vision_package("torchvision", f"torchvision:{name}")
    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        listing = (f"Did you mean {', '.join(close)}?" if close else "The classification models are: "
                   + ", ".join(torchvision.models.list_models(module=torchvision.models)) + ".")
        raise GraphMergeError(f"torchvision has no model named {name!r}. {listing} Write "
                              f"torchvision:NAME with a name from torchvision.models.list_models().")
    shape = input_shape or default_input_shape(name)
    if shape is None:
        raise GraphMergeError(
            f"no default example input for torchvision:{name}, which is not an image classifier. "
            f"Give the shape of one batch it accepts with --input-shape, e.g. --input-shape "
            f"1,3,224,224 (or 1,3,16,112,112 for a video model).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception: init_weights notice
        model = torchvision.models.get_model(name, weights=None)
    return LoadedModel(model=model, example_inputs=_random_input(shape), name=name,
                       source=f"torchvision:{name}")


# --- timm ----------------------------------------------------------------------------------

def _load_timm(name: str, input_shape: tuple[int, ...] | None) -> LoadedModel:
    timm = _import_vision_package("timm", f"timm:{name}")
    if not name or not timm.is_model(name):
        known = timm.list_models()
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = (f"Did you mean {', '.join(close)}?" if close
                else f"No close match among its {len(known)} models.")
        raise GraphMergeError(
            f"timm has no model named {name!r}. {hint} Write timm:NAME with a name from "
            f"timm.list_models() (a pattern narrows it: timm.list_models('resnet*')).")
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as exc:
        raise GraphMergeError(
            f"timm.create_model({name!r}, pretrained=False) raised {one_line(exc)}. Choose another "
            f"timm model, or build this one in a model file and load path/to/model.py.") from exc
    if input_shape is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_shape = (2, *cfg.get("input_size", (3, 224, 224)))
    return LoadedModel(model=model, example_inputs=_random_input(input_shape), name=name,
                       source=f"timm:{name}")


# --- Hugging Face transformers -------------------------------------------------------------

def _load_hf(target: str, input_shape: tuple[int, ...] | None) -> LoadedModel:
    path = Path(target).expanduser()
    save_hint = ("hf:PATH needs a local directory holding config.json and the weights; write it "
                 "with model.save_pretrained(PATH) (hub names are not downloaded).")
    if not path.is_dir():
        where = "is a file, not a directory" if path.exists() else "does not exist"
        raise GraphMergeError(f"hf:{target}: {str(path)!r} {where} (resolved to {path.resolve()}). "
                              f"{save_hint}")
    if not (path / "config.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:8]
        raise GraphMergeError(
            f"hf:{target}: {path.resolve()} has no config.json (it holds: "
            f"{', '.join(found) or 'nothing'}). {save_hint}")
    try:
        import transformers
    except ImportError as exc:
        raise GraphMergeError(
            f"hf:{target} needs transformers, which is not installed ({exc}). Install the hf "
            f"extra: pip install -e '.[hf]'.") from exc
    path = path.resolve()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise GraphMergeError(
            f"reading {path / 'config.json'} raised {one_line(exc)}. Check that the file is the "
            f"config.json written by save_pretrained with this transformers version "
            f"({transformers.__version__}), or upgrade transformers.") from exc
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        cls = getattr(transformers, architectures[0], None)
        if cls is None:
            raise GraphMergeError(
                f"{path / 'config.json'} names architecture {architectures[0]!r}, which "
                f"transformers {transformers.__version__} does not define (custom or newer code is "
                f"not loaded). Upgrade transformers, or build the model in a model file and load "
                f"path/to/model.py.")
    else:
        cls = transformers.AutoModel
    model = _from_pretrained(cls, path)
    model.eval()
    inputs, kwargs = _hf_example(model, config, input_shape, path)
    return LoadedModel(model=model, example_inputs=inputs, name=type(model).__name__,
                       source=f"hf:{path}", example_kwargs=kwargs)


def _from_pretrained(cls: Any, path: Path) -> nn.Module:
    """``cls.from_pretrained`` with SDPA attention, or eager where the class has no SDPA."""
    from transformers.utils import logging as hf_logging

    model, info, error = None, {}, None
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on the CLI's stderr
    try:
        for attention in ("sdpa", "eager"):
            try:
                model, info = cls.from_pretrained(path, local_files_only=True, attn_implementation=attention,
                                                  output_loading_info=True)
                break
            except Exception as exc:  # no SDPA for this class, or the weights are unreadable
                error = exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if model is None:
        raise GraphMergeError(
            f"loading {cls.__name__} from {path} raised {one_line(error)}. hf:PATH needs the "
            f"directory model.save_pretrained(PATH) writes: config.json and the weights "
            f"(model.safetensors); write it again with save_pretrained.") from error
    missing = list(info.get("missing_keys") or []) + [
        str(k[0]) if isinstance(k, (tuple, list)) else str(k) for k in info.get("mismatched_keys") or []]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise GraphMergeError(
            f"the weights in {path} do not cover {cls.__name__}: {len(missing)} parameters are missing "
            f"or have another shape ({shown}), so they would be random. The weights were saved "
            f"from a different model than config.json describes; save both with "
            f"model.save_pretrained(PATH).")
    return model


def _hf_example(model: nn.Module, config: Any, input_shape: tuple[int, ...] | None,
                path: Path) -> tuple[tuple, dict[str, Any]]:
    """-> (example_inputs, example_kwargs) for an HF model (see the module docstring)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    generator = torch.Generator().manual_seed(0)  # the same input on every run
    kwargs: dict[str, Any] = {}
    vision = (getattr(config, "model_type", None) in HF_VISION_MODEL_TYPES
              or (hasattr(config, "image_size") and hasattr(config, "num_channels")))
    if vision:
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        shape = input_shape or (2, getattr(config, "num_channels", 3), height, width)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        main_name, main = "pixel_values", torch.randn(*shape, generator=generator).to(dtype)
    else:
        vocab = getattr(config, "vocab_size", None)
        if not vocab:
            raise GraphMergeError(
                f"cannot make an example input for {type(model).__name__} from {path}: its config "
                f"(model_type {getattr(config, 'model_type', None)!r}) has neither a vocab_size (text "
                f"models get input_ids) nor image_size and num_channels (vision models get "
                f"pixel_values). Load it from a model file whose example_inputs() returns its "
                f"inputs.")
        shape = input_shape or HF_TEXT_SEQUENCE
        main_name, main = "input_ids", torch.randint(0, vocab, shape, generator=generator)
        if "attention_mask" in names:
            kwargs["attention_mask"] = torch.ones(shape, dtype=torch.long)
    if "use_cache" in names:
        kwargs["use_cache"] = False
    if names and names[0] == main_name:
        return (main,), kwargs
    return (), {main_name: main, **kwargs}


# --- files ---------------------------------------------------------------------------------

def _import_example(name: str) -> ModuleType:
    if name not in example_names():
        close = difflib.get_close_matches(name, example_names(), n=3)
        hint = f"Did you mean {', '.join(close)}? " if close else ""
        raise GraphMergeError(
            f"no bundled example named {name!r}. {hint}The examples are: "
            f"{', '.join(example_names())} (use them as examples:NAME).")
    return importlib.import_module(f"graphmerge.examples.{name}")


def _import_file(path: Path) -> ModuleType:
    """Execute a model file as a fresh module under a unique name.

    A unique name means two files both called ``model.py`` (two teachers' folders) do not
    overwrite each other in ``sys.modules``. The file's folder is on ``sys.path`` while it runs
    so it can import its sibling modules.
    """
    if not path.is_file():
        where = "is a directory, not a Python file" if path.is_dir() else "does not exist"
        raise GraphMergeError(
            f"model file {str(path)!r} {where} (resolved to {path.resolve()}). Check the path, "
            f"or use torchvision:NAME or examples:NAME for a bundled model.")
    path = path.resolve()
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_graphmerge_model_{stem}_{next(_module_counter)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[module_name]
        code = f" `{exc.text.strip()}`" if exc.text else ""
        raise GraphMergeError(
            f"model file {path} has a syntax error at {exc.filename}:{exc.lineno}{code}: {exc.msg}. "
            f"Fix the file so that `python {path.name}` runs.") from exc
    except ImportError as exc:
        del sys.modules[module_name]
        raise GraphMergeError(
            f"model file {path} failed to import {exc.name or 'a module'!r} at "
            f"{_location_in(exc, path)}: {one_line(exc)}. Install the missing package in this "
            f"environment, or fix the import (sibling files in {path.parent} are importable).") from exc
    except Exception as exc:
        del sys.modules[module_name]
        raise GraphMergeError(
            f"running model file {path} raised {one_line(exc)} at {_location_in(exc, path)}. Fix "
            f"the file so that `python {path.name}` runs.") from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _pick_factory(module: ModuleType, origin: str, attr: str | None) -> tuple[str, Any]:
    """-> (name, object) of the thing that builds the model: the one named, or the one candidate."""
    if attr is not None:
        if not hasattr(module, attr):
            found = _public_builders(module)
            close = difflib.get_close_matches(attr, found, n=3)
            hint = f"Did you mean {', '.join(close)}? " if close else ""
            raise GraphMergeError(
                f"{origin} defines no {attr!r}. {hint}It defines these functions and classes: "
                f"{', '.join(found) or 'none'}. Write {origin}:NAME with one of them.")
        return attr, getattr(module, attr)
    factories = [n for n in FACTORY_NAMES if callable(getattr(module, n, None))]
    if len(factories) == 1:
        return factories[0], getattr(module, factories[0])
    classes = _module_classes(module)
    buildable = [n for n, cls in classes if not _required_args(cls)]
    if not factories and len(buildable) == 1:
        return buildable[0], getattr(module, buildable[0])
    raise GraphMergeError(_no_single_candidate(origin, factories, classes))


def _no_single_candidate(origin: str, factories: list[str], classes: list[tuple[str, type]]) -> str:
    if factories:
        found = f"several factory functions: {', '.join(factories)}"
    else:
        described = [f"{n}({', '.join(_required_args(c))})" if _required_args(c) else f"{n}()"
                     for n, c in classes]
        found = ("no factory function (build_model, get_model, create_model or model) and "
                 + (f"{len(classes)} nn.Module classes: {', '.join(described)}" if classes
                    else "no nn.Module class defined in the file"))
    return (f"cannot tell which model to build from {origin}: it has {found}. The file needs "
            f"exactly one function named build_model, get_model, create_model or model, or "
            f"exactly one nn.Module class whose constructor takes no required argument. Write "
            f"{origin}:NAME to choose (NAME a function returning the model, or a class).")


def _module_classes(module: ModuleType) -> list[tuple[str, type]]:
    """nn.Module subclasses defined in the file itself (not imported into it)."""
    return [(n, obj) for n, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, nn.Module)
            and obj.__module__ == module.__name__]


def _public_builders(module: ModuleType) -> list[str]:
    return sorted(n for n, obj in vars(module).items()
                  if not n.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                  and getattr(obj, "__module__", None) == module.__name__)


def _required_args(cls: type) -> list[str]:
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _build(factory: Any, where: str) -> nn.Module:
    """Call the factory (or class) with no arguments and check it gives an nn.Module."""
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise GraphMergeError(
            f"{where} is a {type(factory).__name__}, not a function, class or nn.Module. Name a "
            f"function that returns the model, or the model's class.")
    if isinstance(factory, type) and _required_args(factory):
        raise GraphMergeError(
            f"{where} is a class whose constructor needs arguments "
            f"({', '.join(_required_args(factory))}). Add a `build_model()` function to the file "
            f"that constructs it with the values you want, and load that.")
    try:
        model = factory()
    except Exception as exc:
        raise GraphMergeError(
            f"calling {where}() raised {one_line(exc)} at {_location_in(exc, None)}. Fix it so "
            f"that it builds the model with no arguments (give its parameters defaults).") from exc
    if not isinstance(model, nn.Module):
        raise GraphMergeError(
            f"{where}() returned a {type(model).__name__}, not a torch.nn.Module. Make it return "
            f"the model instance.")
    return model


# --- example inputs ------------------------------------------------------------------------

def _file_example_inputs(module: ModuleType, origin: str, model_where: str) -> tuple:
    make = getattr(module, "example_inputs", None)
    if make is None:
        raise GraphMergeError(
            f"no example input for {model_where}: the file defines no example_inputs() function "
            f"and no input shape was given. Pass the shape of one batch with --input-shape, e.g. "
            f"--input-shape 1,3,224,224, or add `def example_inputs(): return "
            f"(torch.randn(1, 3, 224, 224),)` to the file.")
    try:
        inputs = make() if callable(make) else make
    except Exception as exc:
        raise GraphMergeError(
            f"calling example_inputs() in {origin} raised {one_line(exc)} at "
            f"{_location_in(exc, None)}. Fix it, or pass --input-shape instead.") from exc
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs:
        return tuple(inputs)
    raise GraphMergeError(
        f"example_inputs() in {origin} returned {type(inputs).__name__}, expected a tensor or a "
        f"non-empty tuple of the model's positional inputs. Return e.g. "
        f"(torch.randn(1, 3, 32, 32),).")


def _random_input(shape: tuple[int, ...]) -> tuple[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)  # the same input on every run
    return (torch.randn(*shape, generator=generator),)


# --- formatting ----------------------------------------------------------------------------

def _location_in(exc: BaseException, path: Path | None) -> str:
    """file:line `code` of the deepest frame in ``path`` (or outside graphmerge and torch)."""
    torch_dir = str(Path(torch.__file__).parent)
    this_file = str(Path(__file__).resolve())
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if path is not None and Path(frame.filename) != path:
            continue
        if frame.filename.startswith(("<", torch_dir)) or frame.filename == this_file:
            continue
        found = frame
    if found is None:
        return "an unknown line"
    code = f" `{found.line.strip()}`" if found.line else ""
    return f"{found.filename}:{found.lineno}{code}"



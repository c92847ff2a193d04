"""Weights files and resumable training checkpoints, in safetensors only (never pickle).

Two kinds of file:

- **weights** (``save_weights`` / ``read_state_dict`` / ``load_weights``): a plain state dict, loadable by
  anyone with ``safetensors.torch.load_file``. Torch state dicts (``.pt``/``.pth``/``.bin``/``.ckpt``) are
  read with ``torch.load(weights_only=True)`` only, since a full unpickle runs arbitrary code. This is
  the one weights reader of the package: ``merge --teacher``, ``export --weights`` and ``bench M=W``
  all go through it, so they accept and refuse the same files with the same messages.
- **training state** (``save_state`` / ``load_state``): any nesting of dicts, lists, tuples,
  numbers, strings, tensors and numpy arrays (model and optimizer state dicts, RNG states,
  history). Tensors go into the safetensors file under path-like keys
  (``optim/gate/state/0/momentum_buffer``); the structure, with a placeholder where each tensor
  was, goes as JSON into the file's metadata. One file holds both, so one atomic rename commits
  a consistent checkpoint.

Every write goes through ``graphmerge.passes.util.write_atomic``: a temporary file in the destination
folder, fsynced, then ``os.replace``d over the target, so a crash at any moment leaves either the old
file or the new one, never a torn one, and no temporary file behind.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphmerge.errors import GraphMergeError, ModelMismatchError
from graphmerge.passes.util import one_line, write_atomic

__all__ = ["capture_rng", "check_state_dict", "load_state", "load_weights", "read_state_dict", "restore_rng",
           "save_state", "save_weights"]

STATE_FORMAT = "graphmerge-training-state"
STATE_VERSION = "1"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


# --- weights -------------------------------------------------------------------------------

def save_weights(path: str | Path, weights: nn.Module | Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write a model's (or a state dict's) tensors as a safetensors file, atomically."""
    from safetensors.torch import save

    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    tensors = {key: _standalone(value) for key, value in state.items()}
    write_atomic(path, save(tensors, metadata=dict(metadata or {})))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle (``.pt``/``.pth``/``.bin``/``.ckpt``).

    Pickles are read with ``torch.load(weights_only=True)`` only: a full unpickle runs arbitrary code
    from the file. ``{"state_dict": sd}``-style wrappers and DataParallel's ``module.`` prefix are
    unwrapped. The one reader behind ``merge --teacher``, ``export --weights`` and ``bench M=W``.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise GraphMergeError(f"unknown weights format of {path}: use .safetensors (preferred) or a torch state "
                              f"dict ending in {', '.join(PICKLE_SUFFIXES)} (read with weights_only=True).")
    if not path.is_file():
        raise GraphMergeError(f"weights file {path} does not exist. Check the path (train a teacher with "
                              f"`graphmerge train MODEL --data DATA --out {path.name}`).")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise GraphMergeError(f"cannot read {path} as safetensors: {one_line(exc)}. Is the file complete? "
                                  f"Re-save it with safetensors.torch.save_file(model.state_dict(), path).") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for non-tensor pickles, RuntimeError for corrupt files
        raise GraphMergeError(
            f"cannot read {path} with torch.load(weights_only=True): {_unpickling_cause(exc)}. graphmerge only "
            f"reads plain state dicts (tensors in dicts), never a full unpickle; re-save with "
            f"torch.save(model.state_dict(), path) or safetensors.torch.save_file.") from exc
    return _unwrap_state_dict(obj, path)


def _unpickling_cause(exc: Exception) -> str:
    """The informative part of torch.load's error (torch's own text goes on to suggest weights_only=False,
    which graphmerge never uses)."""
    text = str(exc)
    refused = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if refused:
        return f"it pickles {refused.group(1)}, not only tensors"
    if text.startswith("Weights only load failed"):
        lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
        detail = [line for line in lines if not line.startswith(("Please file an issue", "Check the documentation"))]
        return f"{type(exc).__name__}: {detail[0].rstrip('.') if detail else 'not a plain state dict'}"
    return one_line(exc, limit=160)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept ``{"state_dict": sd}``-style wrappers and DataParallel's ``module.`` prefix."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if _is_tensor_mapping(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_mapping(obj):
        raise GraphMergeError(f"{path} does not hold a state dict (a mapping of names to tensors). Save one "
                              f"with torch.save(model.state_dict(), path) or safetensors.torch.save_file.")
    state = dict(obj)
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_weights(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor],
                 name: str | None = None) -> nn.Module:
    """Load weights into ``model`` strictly; a mismatch names the first bad key and both shapes."""
    state = read_state_dict(source) if isinstance(source, str | Path) else source
    check_state_dict(model, state, name or str(source if isinstance(source, str | Path) else "state dict"))
    model.load_state_dict(state, strict=True)
    return model


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Raise ``ModelMismatchError`` naming the first mis-shaped, missing and unexpected key, with counts."""
    expected = model.state_dict()
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{k!r} has shape {tuple(state[k].shape)} in the checkpoint but {tuple(expected[k].shape)} "
                     f"in the model{_more(wrong)}")
    if missing:
        parts.append(f"key {missing[0]!r} (shape {tuple(expected[missing[0]].shape)}) is missing from the "
                     f"checkpoint{_more(missing)}")
    if unexpected:
        parts.append(f"the checkpoint has an unexpected key {unexpected[0]!r} (shape "
                     f"{tuple(state[unexpected[0]].shape)}){_more(unexpected)}")
    if parts:
        raise ModelMismatchError(
            f"{name} does not match the model {type(model).__name__}: {'; '.join(parts)}. Check that the "
            f"checkpoint was saved from this architecture and width (a merged student has the teachers' "
            f"width, a big student N times it).")


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares memory with nothing (safetensors refuses shared tensors)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


# --- training state ------------------------------------------------------------------------

def save_state(path: str | Path, state: Any) -> None:
    """Write a nested training state (see module docstring) as one safetensors file, atomically."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    structure = _pack(state, "", tensors)
    metadata = {"format": STATE_FORMAT, "version": STATE_VERSION, "state": json.dumps(structure)}
    write_atomic(path, save(tensors, metadata=metadata))


def load_state(path: str | Path) -> Any:
    """Read back what ``save_state`` wrote."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise GraphMergeError(f"cannot read checkpoint {path}: {exc}. Delete it to start over.") from exc
    if metadata.get("format") != STATE_FORMAT:
        raise GraphMergeError(f"{path} is not a graphmerge training checkpoint (no training state in its "
                              f"metadata). Point --checkpoint-dir at a folder graphmerge wrote.")
    return _unpack(json.loads(metadata["state"]), tensors)


def _pack(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure of ``obj`` with tensors moved into ``tensors`` under path-like keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = _standalone(obj)
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(obj.copy())
        return {"$ndarray": key}
    if isinstance(obj, Counter):
        return {"$counter": [[_pack(k, f"{key}/k{i}", tensors), v] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _pack(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        return {"$items": [[_pack(k, f"{key}/k{i}", tensors), _pack(v, f"{key}/{k}", tensors)]
                           for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"$tuple": [_pack(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_pack(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {key!r} in a checkpoint")


def _unpack(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if "$ndarray" in obj:
        return tensors[obj["$ndarray"]].numpy()
    if "$counter" in obj:
        return Counter({_unpack(k, tensors): v for k, v in obj["$counter"]})
    if "$items" in obj:
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in obj["$items"]}
    if "$tuple" in obj:
        return tuple(_unpack(v, tensors) for v in obj["$tuple"])
    return {k: _unpack(v, tensors) for k, v in obj.items()}


# --- random number generators --------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """Every global RNG state a training step may draw from: torch (CPU, CUDA), numpy, Python."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(tuple(state["numpy"]))
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

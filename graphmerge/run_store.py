"""The files of a resumable run, and what makes a resumed run draw the same numbers.

``CheckpointStore`` is the one checkpoint file of a ``merge`` or ``train`` run (written by the main
rank after every epoch; loading refuses a checkpoint whose settings differ from the run's),
``EpochLog`` sends each epoch's record to a callable or a JSON-lines file. A checkpoint recognises
its inputs by ``state_digest`` (the teachers' tensors) and ``data_size``; every phase starts from
``seed_everything``.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphmerge import checkpoint as ckpt
from graphmerge.errors import GraphMergeError
from graphmerge.training import DistContext

CHECKPOINT_NAME = "merge.safetensors"
TRAIN_CHECKPOINT_NAME = "train.safetensors"
LogSink = Callable[[dict[str, Any]], None] | str | Path | None


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def state_digest(modules: Sequence[nn.Module]) -> str | None:
    """SHA-256 over every tensor of the given teachers: resuming with other teachers is refused."""
    if not modules:
        return None
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_size(data: Any) -> int | None:
    """Samples in a data set (or batches in a loader); None when it has no length."""
    try:
        return len(data.dataset) if hasattr(data, "dataset") else len(data)
    except TypeError:
        return None


class CheckpointStore:
    """The one checkpoint file of a run; only the main rank writes, every rank waits for it."""

    def __init__(self, folder: str | Path | None, name: str, ctx: DistContext):
        self.path = Path(folder) / name if folder is not None else None
        self.ctx = ctx
        if self.path is not None and ctx.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self.ctx.is_main:
            ckpt.save_state(self.path, state)
        self.ctx.barrier()

    def load(self, settings: Mapping[str, Any]) -> dict[str, Any] | None:
        """The saved state, or None (with a warning) when there is nothing to resume."""
        if self.path is None:
            raise GraphMergeError("resume=True needs checkpoint_dir (the folder of the run to resume).")
        if not self.path.is_file():
            warnings.warn(f"nothing to resume in {self.path.parent}: starting from scratch.", stacklevel=3)
            return None
        state = ckpt.load_state(self.path)
        saved = json.loads(json.dumps(state["settings"], default=str))
        wanted = json.loads(json.dumps(dict(settings), default=str))
        for key in sorted(set(saved) | set(wanted)):
            if saved.get(key) != wanted.get(key):
                raise GraphMergeError(
                    f"the checkpoint in {self.path.parent} was written with {key}={saved.get(key)!r}, but "
                    f"this run has {key}={wanted.get(key)!r}. Resume with the original settings, or use a "
                    f"new checkpoint folder.")
        return state


class EpochLog:
    """Sends each epoch record to a callable and/or appends it as a JSON line (main rank only)."""

    def __init__(self, sink: LogSink, ctx: DistContext):
        self.sink = sink
        self.ctx = ctx

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.ctx.is_main or self.sink is None:
            return
        if callable(self.sink):
            self.sink(dict(record))
            return
        with open(self.sink, "a") as handle:
            handle.write(json.dumps(record) + "\n")

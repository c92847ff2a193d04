"""Small helpers shared by the passes and the driver (one home each).

The passes never import the driver package (``graphmerge/*.py``); the driver imports these from
here. Nothing in this module depends on any other pass.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphmerge.passes.errors import GraphMergeError

if TYPE_CHECKING:  # torch is not imported here, so the CLI's --help stays fast
    from torch import nn

__all__ = ["check_teacher_count", "eval_mode", "getattr_path", "one_line", "replace_atomic", "training_mode",
           "write_atomic"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MISSING = object()


# --- messages ------------------------------------------------------------------------------

def one_line(exc: BaseException, limit: int = 400, *, first: bool = False) -> str:
    """``Type: message`` on one line (whitespace folded, colours and the final period dropped, at
    most ``limit`` characters of message), for one-paragraph error messages; the type alone when
    the message is empty. ``first``: only the message's first non-empty line (torch.export's
    errors go on for pages)."""
    message = _ANSI.sub("", str(exc))
    if first:
        message = next((line for line in message.splitlines() if line.strip()), "")
    text = " ".join(message.split()).rstrip(". ")
    if len(text) > limit:
        text = text[: limit - 6].rstrip() + " [...]"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_teacher_count(count: int, fix: str) -> None:
    """Merging needs two or more teachers; ``fix`` says how to supply them where the call came from."""
    if count < 2:
        raise GraphMergeError(f"merging needs at least 2 teachers, got {count}: {fix}")


# --- modules -------------------------------------------------------------------------------

@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put ``model`` in train (``True``) or eval mode for the duration, then restore every submodule's
    own flag: a user's deliberately frozen submodule (BatchNorm left in eval inside a training model)
    stays as it was, which ``model.train(was_training)`` would not do."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """``training_mode(model, False)``: eval mode for the duration, every flag restored after."""
    return training_mode(model, False)


def getattr_path(root: Any, path: str, default: Any = _MISSING) -> Any:
    """``root.a.b.c`` for ``path="a.b.c"``; ``default`` (if given) where a link is missing, else
    ``AttributeError``."""
    value = root
    for part in path.split("."):
        value = getattr(value, part, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise AttributeError(f"{type(root).__name__} has no attribute path {path!r} (missing {part!r})")
            return default
    return value


# --- files ---------------------------------------------------------------------------------

def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and ``os.replace``:
    a crash at any moment leaves the old file or the new one, never a torn one, and no temporary
    file behind. ``str`` is written as UTF-8."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise GraphMergeError(f"cannot write {path}: folder {folder} does not exist. Create it first or "
                              f"choose another path.")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(folder)
    return path


def replace_atomic(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move an already written ``source`` over ``target`` durably (fsync, ``os.replace``, fsync of the
    folder); for files a library wrote itself (an ONNX exporter), which ``write_atomic`` cannot."""
    source, target = Path(source), Path(target)
    with open(source, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(source, target)
    _fsync_folder(target.parent)
    return target


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible, nor needed, on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

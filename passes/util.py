"""Small helpers shared by the passes and the driver (one home each).

The passes never import the driver package (``graphmerge/*.py``); the driver imports these from
here. Nothing in this module depends on any other pass.
"""

from __future__ import annotations

import re

__all__ = ["one_line"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line (whitespace folded, colours and the final period dropped, at
    most ``limit`` characters of message), for one-paragraph error messages; the type alone when
    the message is empty."""
    text = " ".join(_ANSI.sub("", str(exc)).split()).rstrip(". ")
    if len(text) > limit:
        text = text[: limit - 6].rstrip() + " [...]"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

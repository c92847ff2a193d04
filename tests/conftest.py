"""Shared fixtures and hypothesis profiles.

Profiles: "default" (200 examples) is loaded here; ``--hypothesis-profile=thorough`` (3000
examples, used by ``make test-full``) is applied afterwards by hypothesis' own pytest plugin.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# One intra-op thread per test process: the suite runs on 2 processes (-n 2), and tiny convs are
# far slower when two processes each spin two threads on two cores.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the packages import without `pip install -e .` too
    sys.path.insert(0, str(REPO_ROOT))

# CI runs the property tests with a fixed seed (derandomize); `make fuzz` draws fresh seeds.
settings.register_profile("default", max_examples=100, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=3000, deadline=None, derandomize=True)
settings.register_profile("fuzz", max_examples=int(os.environ.get("GRAPHMERGE_FUZZ_EXAMPLES", "10000")),
                          deadline=None, derandomize=False, database=None)
settings.load_profile("default")


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


@pytest.fixture(autouse=True)
def _release_memory():
    """Give freed memory back to the OS after each test: glibc keeps a worker's freed arenas, so
    without this a worker's resident size only grows over the session."""
    yield
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m graphmerge.cli ARGS`` in a fresh process, in ``tmp_path`` by default."""

    def run(*args: str, cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])), "COLUMNS": "200"}
        full_env.update(env or {})
        return subprocess.run([sys.executable, "-m", "graphmerge.cli", *args], cwd=cwd or tmp_path,
                              capture_output=True, text=True, timeout=timeout, env=full_env)

    return run


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write dedented ``source`` to ``tmp_path/name`` and return its path."""

    def write(name: str, source: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path

    return write


@pytest.fixture
def sine_merge_args(tmp_path: Path) -> list[str]:
    """Two untrained sine MLP teachers saved in ``tmp_path`` and the ``graphmerge merge`` arguments
    for a one-step gate phase and a one-step fine-tuning on the sine data (run_cli's default folder)."""
    from graphmerge import checkpoint
    from graphmerge.examples.mlp import build_model

    torch.manual_seed(0)
    for name in ("a", "b"):
        checkpoint.save_weights(tmp_path / f"{name}.safetensors", build_model())
    return ["--teacher", "a.safetensors", "--teacher", "b.safetensors", "--data", "sine", "--batch-size", "500",
            "--gate-epochs", "1", "--finetune-epochs", "1"]

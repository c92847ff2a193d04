"""Data sets for training teachers and merging: built-ins, user files, and real image loaders.

``load_data(spec)`` turns a command-line data spec into ``(train, val, test, task)``:

- ``sine``: the paper's toy regression, x ~ U(0, 1), y = sin(10πx) + N(0, 0.2²); 10 000 training
  samples, fresh validation and test samples, all seeded.
- ``mnist1d``: MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d`` package (never
  downloaded): inputs (N, 1, 40), 10 classes.
- ``digits``: scikit-learn's 8×8 handwritten digits as (N, 1, 8, 8) in [0, 1], 10 classes.
- ``chars``: next-character prediction on the source of a fixed list of Python standard-library
  modules (ships with Python, never downloaded): (input ids (64,), next-char ids (64,)) windows,
  bytes clipped to 0-127; 200 000 training characters, 20 000 validation, 20 000 test.
- ``path/to/data.py``: a file defining ``train_data()`` and optionally ``val_data()``,
  ``test_data()`` (each returning a Dataset or DataLoader) and ``TASK`` ("classification" or
  "regression"; inferred from the target dtype when absent).
- ``imagefolder:PATH[:SIZE]``: ``PATH/train`` and ``PATH/val`` in torchvision ImageFolder layout.
- ``cifar10:PATH``: CIFAR-10 from an existing local ``cifar-10-batches-py`` folder (no download).
- ``text:PATH``: plain text for ``hf:`` language models, tokenised with the model's tokenizer
  (``graphmerge/text_data.py``; the commands load it through ``graphmerge/hf.py``).

``task`` decides the default loss: cross-entropy for classification, MSE for regression.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from graphmerge.errors import GraphMergeError

__all__ = ["BUILTINS", "chars", "cifar", "digits", "first_inputs", "image_folder", "infer_task", "load_data", "mnist1d",
           "sine"]

CLASSIFICATION = "classification"
REGRESSION = "regression"
TASKS = (CLASSIFICATION, REGRESSION)
BUILTINS = ("sine", "mnist1d", "digits", "chars")

DataSplits = tuple[Any, Any, Any, str]


# --- built-ins -----------------------------------------------------------------------------

def sine(n_train: int = 10_000, n_val: int = 2_000, n_test: int = 2_000, *, noise: float = 0.2,
         seed: int = 0) -> DataSplits:
    """The paper's sine problem; each split draws its own samples from its own seeded generator.

    Validation and test targets are noisy too, as in the paper (its best test MSE, 0.049, sits
    just above the noise floor 0.2² = 0.04).
    """
    def draw(n: int, offset: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(seed * 1000 + offset)
        x = torch.rand(n, 1, generator=generator)
        y = torch.sin(10 * torch.pi * x) + noise * torch.randn(n, 1, generator=generator)
        return TensorDataset(x, y)

    return draw(n_train, 0), draw(n_val, 1), draw(n_test, 2), REGRESSION


def mnist1d(n_val: int = 500, *, seed: int = 42) -> DataSplits:
    """MNIST-1D with the package's default arguments: 4000 train (minus ``n_val``) and 1000 test.

    ``make_dataset`` reseeds numpy's and Python's global generators; they are restored afterwards
    so that loading data never changes a training run's random stream.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise GraphMergeError(
            f"the mnist1d data set needs the mnist1d package, which is not installed ({exc}). "
            f"Install the data extra: pip install -e '.[data]'.") from exc
    args = get_dataset_args()
    args.seed = seed
    with _preserved_global_rngs():
        raw = make_dataset(args)
    x = torch.as_tensor(raw["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.as_tensor(raw["y"], dtype=torch.int64)
    x_test = torch.as_tensor(raw["x_test"], dtype=torch.float32).unsqueeze(1)
    y_test = torch.as_tensor(raw["y_test"], dtype=torch.int64)
    n_train = len(y) - n_val
    return (TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]),
            TensorDataset(x_test, y_test), CLASSIFICATION)


def digits(n_val: int = 300, n_test: int = 300, *, seed: int = 0) -> DataSplits:
    """scikit-learn's 1797 8×8 digits, scaled to [0, 1], split by a fixed seeded permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise GraphMergeError(
            f"the digits data set needs scikit-learn, which is not installed ({exc}). Install the "
            f"data extra: pip install -e '.[data]'.") from exc
    raw = load_digits()
    x = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(raw.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return (TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]),
            TensorDataset(x[test], y[test]), CLASSIFICATION)


CHARS_MODULES = ("argparse", "textwrap", "string", "functools", "dataclasses", "collections", "enum",
                 "pathlib", "shutil", "inspect", "typing")


def chars(context: int = 64, n_train: int = 200_000, n_val: int = 20_000, n_test: int = 20_000) -> DataSplits:
    """Character-level language modelling on Python's own standard-library source.

    The corpus is the source of ``CHARS_MODULES`` (read with ``inspect.getsource``, concatenated
    in that order until long enough), as bytes with values above 127 clipped to 127; it is split
    by position: the first ``n_train`` characters train, the next ``n_val`` validate, the next
    ``n_test`` test. Each split is cut into non-overlapping windows: input ``text[i:i+context]``,
    target ``text[i+1:i+context+1]`` (both int64). Deterministic for a given Python version (the
    modules' source differs between versions). The loss is cross-entropy over all positions;
    divide it by ln 2 for bits per character.
    """
    import importlib
    import inspect

    needed = n_train + n_val + n_test
    pieces, length = [], 0
    for name in CHARS_MODULES:
        source = inspect.getsource(importlib.import_module(name)).encode("utf-8")
        pieces.append(source)
        length += len(source)
        if length >= needed:
            break
    if length < needed:
        raise GraphMergeError(f"the chars corpus has only {length} characters; ask for at most {length} "
                              f"(n_train + n_val + n_test = {needed}).")
    text = torch.frombuffer(bytearray(b"".join(pieces)[:needed]), dtype=torch.uint8).clamp(max=127).long()

    def windows(part: torch.Tensor) -> TensorDataset:
        count = (len(part) - 1) // context
        x = part[:count * context].reshape(count, context)
        y = part[1:count * context + 1].reshape(count, context)
        return TensorDataset(x.clone(), y.clone())

    bounds = (0, n_train, n_train + n_val, needed)
    train, val, test = (windows(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    return train, val, test, CLASSIFICATION


@contextmanager
def _preserved_global_rngs() -> Iterator[None]:
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


# --- users' own data -----------------------------------------------------------------------

def image_folder(path: str | Path, size: int = 32) -> Dataset:
    """A torchvision ImageFolder (one sub-folder per class), resized to ``size``×``size``."""
    from torchvision import datasets, transforms

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise GraphMergeError(
            f"image folder {folder} does not exist. Point to a folder with one sub-folder of images "
            f"per class (torchvision ImageFolder layout).")
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise GraphMergeError(
            f"cannot read {folder} as an image folder: {exc}. Expected one sub-folder per class, "
            f"each holding image files (.png, .jpg, ...).") from exc


def cifar(path: str | Path, *, train: bool = True) -> Dataset:
    """CIFAR-10 from a local folder holding ``cifar-10-batches-py``; never downloads.

    torchvision verifies the files' checksums and reads its pickled batches itself.
    """
    from torchvision import datasets, transforms

    root = Path(path).expanduser()
    try:
        return datasets.CIFAR10(str(root), train=train, download=False, transform=transforms.ToTensor())
    except RuntimeError as exc:
        raise GraphMergeError(
            f"no usable CIFAR-10 under {root}: {exc}. Put the extracted cifar-10-batches-py folder "
            f"(from cifar-10-python.tar.gz) inside {root}; graphmerge never downloads data.") from exc


# --- specs ---------------------------------------------------------------------------------

def load_data(spec: str) -> DataSplits:
    """Resolve a data spec (see the module docstring) to ``(train, val, test, task)``."""
    if spec in BUILTINS:
        return {"sine": sine, "mnist1d": mnist1d, "digits": digits, "chars": chars}[spec]()
    if spec.startswith("imagefolder:"):
        return _image_folder_spec(spec[len("imagefolder:"):])
    if spec.startswith("text:"):
        raise GraphMergeError(f"--data {spec}: text is tokenised with a model's tokenizer, so text:PATH goes with "
                              f"hf:DIR models (graphmerge train hf:DIR --data {spec} --out OUT); in Python use "
                              f"graphmerge.text_dataset(path, tokenizer, block_size).")
    if spec.startswith("cifar10:"):
        root = spec[len("cifar10:"):]
        return cifar(root, train=True), cifar(root, train=False), None, CLASSIFICATION
    if spec.endswith(".py"):
        return _load_data_file(Path(spec))
    raise GraphMergeError(
        f"unknown data spec {spec!r}: use a built-in ({', '.join(BUILTINS)}), path/to/data.py "
        f"defining train_data() and val_data(), imagefolder:PATH[:SIZE] or cifar10:PATH.")


def _image_folder_spec(rest: str) -> DataSplits:
    path, _, size = rest.rpartition(":") if rest.rpartition(":")[2].isdigit() else (rest, "", "32")
    root = Path(path).expanduser()
    splits = [root / name for name in ("train", "val")]
    missing = [str(p) for p in splits if not p.is_dir()]
    if missing:
        raise GraphMergeError(
            f"imagefolder:{rest} needs the sub-folders train/ and val/ under {root}, each in "
            f"ImageFolder layout; missing: {', '.join(missing)}.")
    return image_folder(splits[0], int(size)), image_folder(splits[1], int(size)), None, CLASSIFICATION


def _load_data_file(path: Path) -> DataSplits:
    module = _import_data_file(path)
    if not callable(getattr(module, "train_data", None)):
        raise GraphMergeError(
            f"{path} defines no function train_data(). Add `def train_data(): return dataset` "
            f"returning a torch Dataset or DataLoader of (input, target) pairs, and optionally "
            f"val_data() and test_data().")
    train = _call(module, "train_data", path)
    val = _call(module, "val_data", path) if callable(getattr(module, "val_data", None)) else None
    test = _call(module, "test_data", path) if callable(getattr(module, "test_data", None)) else None
    task = getattr(module, "TASK", None) or infer_task(train)
    if task not in TASKS:
        raise GraphMergeError(f"{path}: TASK = {task!r}; use 'classification' or 'regression'.")
    return train, val, test, task


def _import_data_file(path: Path) -> Any:
    path = path.expanduser()
    if not path.is_file():
        raise GraphMergeError(f"data file {path} does not exist. Check the path, or use a built-in "
                              f"data set: {', '.join(BUILTINS)}.")
    name = f"_graphmerge_data_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise GraphMergeError(f"importing data file {path} failed: {type(exc).__name__}: {exc}. "
                              f"Fix the file and retry.") from exc
    return module


def _call(module: Any, function: str, path: Path) -> Any:
    try:
        data = getattr(module, function)()
    except Exception as exc:
        raise GraphMergeError(f"{path}: {function}() raised {type(exc).__name__}: {exc}.") from exc
    if not isinstance(data, (Dataset, DataLoader)):
        raise GraphMergeError(f"{path}: {function}() returned {type(data).__name__}; return a torch "
                              f"Dataset or DataLoader of (input, target) pairs.")
    return data


def infer_task(data: Dataset | DataLoader) -> str:
    """Integer targets mean classification, floating ones regression."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    try:
        _, target = dataset[0]
    except Exception as exc:
        raise GraphMergeError(f"cannot read a first (input, target) sample from the training data: "
                              f"{type(exc).__name__}: {exc}. Each item must be an (input, target) pair, "
                              f"or set TASK in the data file.") from exc
    target = torch.as_tensor(target)
    return REGRESSION if target.is_floating_point() else CLASSIFICATION


def first_example(data: Dataset | DataLoader, count: int = 2) -> tuple[tuple, dict[str, torch.Tensor]]:
    """The first ``count`` samples' inputs as one batch, positional and keyword (a dict dataset's
    entries but ``labels``): the example inputs for capture."""
    if isinstance(data, DataLoader):
        batch = next(iter(data))
    elif isinstance(data[0], Mapping):
        batch = default_collate([data[i] for i in range(min(count, len(data)))])
    else:
        batch = None
    if isinstance(batch, Mapping):
        loose = [k for k, v in batch.items() if not isinstance(v, torch.Tensor)]
        if loose:
            raise GraphMergeError(f"the data's dict items hold {', '.join(loose)} as Python lists or numbers, which "
                                  f"batch into lists of per-position tensors, not one tensor each. Give tensors: "
                                  f"for a Hugging Face datasets.Dataset pass dataset.with_format('torch').")
        return (), {k: v[:count] for k, v in batch.items() if k != "labels"}
    return first_inputs(data, count), {}


def first_inputs(data: Dataset | DataLoader, count: int = 2) -> tuple:
    """The inputs of the first ``count`` samples as one batch: an example input for tracing."""
    if isinstance(data, DataLoader):
        inputs = next(iter(data))[0]
        return tuple(x[:count] for x in inputs) if isinstance(inputs, list | tuple) else (inputs[:count],)
    items = [data[i][0] for i in range(min(count, len(data)))]
    return (torch.stack([torch.as_tensor(x) for x in items]),)

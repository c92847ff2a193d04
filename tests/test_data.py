"""Built-in data sets have the documented shapes and ranges; specs and user loaders fail clearly."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from graphmerge.data import cifar, first_inputs, image_folder, infer_task, load_data, sine
from graphmerge.errors import GraphMergeError


def test_sine_matches_the_paper_definition():
    train, val, test, task = load_data("sine")
    assert task == "regression"
    assert (len(train), len(val), len(test)) == (10_000, 2_000, 2_000)
    x, y = train.tensors
    assert x.shape == (10_000, 1) and y.shape == (10_000, 1)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    residual = y - torch.sin(10 * torch.pi * x)
    assert abs(float(residual.std()) - 0.2) < 0.01  # noise N(0, 0.2^2)
    assert abs(float(residual.mean())) < 0.01
    assert not torch.equal(val.tensors[0], test.tensors[0])  # fresh samples per split


def test_sine_is_seeded():
    assert torch.equal(sine()[0].tensors[1], sine()[0].tensors[1])
    assert not torch.equal(sine(seed=0)[0].tensors[1], sine(seed=1)[0].tensors[1])


def test_mnist1d_shapes_and_labels_and_no_global_rng_side_effect():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    train, val, test, task = load_data("mnist1d")
    assert np.random.rand() == expected  # make_dataset reseeds numpy; we restore it
    assert task == "classification"
    assert (len(train), len(val), len(test)) == (3500, 500, 1000)
    x, y = train.tensors
    assert x.shape == (3500, 1, 40) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))


def test_digits_shapes_and_range():
    train, val, test, task = load_data("digits")
    assert task == "classification"
    assert len(train) + len(val) + len(test) == 1797
    x, y = train.tensors
    assert x.shape[1:] == (1, 8, 8)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))


def test_unknown_spec_names_the_choices():
    with pytest.raises(GraphMergeError, match="unknown data spec 'nope'.*sine"):
        load_data("nope")


def test_data_file_without_train_data_is_explained(write_file):
    path = write_file("data.py", "x = 1\n")
    with pytest.raises(GraphMergeError, match="no function train_data"):
        load_data(str(path))


def test_data_file_with_wrong_return_type_is_explained(write_file):
    path = write_file("data.py", "def train_data():\n    return [1, 2]\n")
    with pytest.raises(GraphMergeError, match="train_data\\(\\) returned list"):
        load_data(str(path))


def test_data_file_is_loaded_and_task_inferred(write_file):
    path = write_file("data.py", """
        import torch
        from torch.utils.data import TensorDataset
        def train_data():
            return TensorDataset(torch.randn(6, 3), torch.randint(0, 2, (6,)))
        def val_data():
            return TensorDataset(torch.randn(4, 3), torch.randint(0, 2, (4,)))
    """)
    train, val, test, task = load_data(str(path))
    assert (len(train), len(val), test, task) == (6, 4, None, "classification")
    assert first_inputs(train)[0].shape == (2, 3)


def test_infer_task_from_float_targets():
    from torch.utils.data import TensorDataset

    assert infer_task(TensorDataset(torch.zeros(2, 1), torch.zeros(2, 1))) == "regression"


def test_image_folder_reads_pngs(tmp_path: Path):
    from PIL import Image

    for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 12), colour).save(tmp_path / label / f"{i}.png")
    dataset = image_folder(tmp_path, size=8)
    assert len(dataset) == 4 and dataset.classes == ["cat", "dog"]
    image, label = dataset[3]
    assert image.shape == (3, 8, 8) and label == 1
    assert float(image[2].min()) == 1.0 and float(image[0].max()) == 0.0  # blue dog


def test_image_folder_missing_is_explained(tmp_path: Path):
    with pytest.raises(GraphMergeError, match="does not exist"):
        image_folder(tmp_path / "missing")


def _write_fake_cifar(root: Path) -> dict[str, str]:
    """A CIFAR-10 folder with 3 images per batch file; returns md5 per file name."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    rng = np.random.default_rng(0)
    for index, name in enumerate(names):
        batch = {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [index % 10, 1, 2]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_cifar_reads_a_local_folder_without_downloading(tmp_path: Path, monkeypatch):
    from torchvision.datasets import CIFAR10

    md5 = _write_fake_cifar(tmp_path)
    train_files = [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
    monkeypatch.setattr(CIFAR10, "train_list", train_files)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": md5["batches.meta"]})
    train = cifar(tmp_path, train=True)
    test = cifar(tmp_path, train=False)
    assert (len(train), len(test)) == (15, 3)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label == 0
    assert test[0][1] == 5


def test_cifar_missing_folder_is_explained(tmp_path: Path):
    with pytest.raises(GraphMergeError, match="never downloads"):
        cifar(tmp_path)

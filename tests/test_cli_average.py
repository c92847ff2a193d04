"""``graphmerge average``: the result against weights computed here by hand."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from test_cli import assert_user_error

from graphmerge import checkpoint
from graphmerge.examples.mlp import build_model


def _teachers(tmp_path: Path, permute: bool) -> tuple[dict, dict]:
    """Teacher a, and b: an independent network, or a with its hidden units permuted by hand."""
    torch.manual_seed(0)
    a, b = build_model(), build_model()
    if permute:
        perm = torch.randperm(a.fc1.out_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            b.fc1.weight.copy_(a.fc1.weight[perm])
            b.fc1.bias.copy_(a.fc1.bias[perm])
            b.fc2.weight.copy_(a.fc2.weight[:, perm])
            b.fc2.bias.copy_(a.fc2.bias)
    checkpoint.save_weights(tmp_path / "a.safetensors", a)
    checkpoint.save_weights(tmp_path / "b.safetensors", b)
    return a.state_dict(), b.state_dict()


ARGS = ["average", "examples:mlp", "-t", "a.safetensors", "-t", "b.safetensors", "--data", "sine"]


def _average(run_cli, tmp_path: Path, *options: str, says: str) -> dict[str, torch.Tensor]:
    """Run ``graphmerge average`` with ``options``; check it says ``says``; the weights it wrote."""
    result = run_cli(*ARGS, *options, "--out", "out.safetensors")
    assert result.returncode == 0, result.stderr
    assert says in result.stdout, result.stdout
    return load_file(tmp_path / "out.safetensors")


def test_plain_average_is_the_elementwise_mean(run_cli, tmp_path: Path) -> None:
    a, b = _teachers(tmp_path, permute=False)
    written = _average(run_cli, tmp_path, "--align", "none", says="average: val loss")
    for key in a:
        torch.testing.assert_close(written[key], (a[key] + b[key]) / 2)


def test_aligned_average_of_a_network_and_its_permutation_is_the_network(run_cli, tmp_path: Path) -> None:
    """Weight matching undoes the hand-made permutation, so the average and the mosaic are the
    network itself. (Feature matching cannot here: on a 1-d input every two ReLU units active over the
    whole range correlate perfectly; ``tests/test_align.py`` checks it on richer models.)"""
    a, _ = _teachers(tmp_path, permute=True)
    for how, options in (("average", ()), ("mosaic", ("--mosaic",))):
        written = _average(run_cli, tmp_path, "--align", "weights", *options,
                           says=f"{how} after weights alignment: val loss")
        for key in a:
            torch.testing.assert_close(written[key], a[key], msg=f"{how}: {key}")


def test_feature_alignment_runs_and_writes_the_architecture(run_cli, tmp_path: Path) -> None:
    a, _ = _teachers(tmp_path, permute=True)
    written = _average(run_cli, tmp_path, says="average after features alignment: val loss")  # the default
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in a.items()}


def test_bad_options_are_refused_before_anything_is_written(run_cli, tmp_path: Path) -> None:
    _teachers(tmp_path, permute=False)
    assert_user_error(run_cli(*ARGS, "--align", "sideways"), "--align 'sideways'", "features")
    assert_user_error(run_cli(*ARGS, "--align", "none", "--mosaic"), "--mosaic", "--align features")
    assert_user_error(run_cli("average", "examples:mlp", "-t", "a.safetensors", "--data", "sine"), "--teacher")
    assert_user_error(run_cli(*ARGS, "--out", "average.pt"), ".safetensors")
    assert not list(tmp_path.glob("average*"))

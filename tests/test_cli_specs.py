"""The CLI on the ``timm:NAME`` and ``hf:PATH`` model specs, and on errors that reach it as
subclasses of ``GraphMergeError`` (``CertificateError`` from inside ``merge``).

``hf:`` models are built by ``tests/hf_tiny.py`` (tiny configs, random weights, nothing
downloaded) and saved with ``save_pretrained``. Commands that only feed positional inputs
(export, bench, train, merge) refuse models that need keyword inputs in one paragraph.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_cli import assert_user_error, widths_of

SEQUENTIAL_FILE = """
    import torch
    from torch import nn

    def build_model():
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(),
                             nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 7)), nn.Linear(7, 3))

    def example_inputs():
        return (torch.randn(2, 4),)
"""


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny BertForSequenceClassification and LlamaForCausalLM, each saved in its own folder."""
    pytest.importorskip("transformers")
    from tests.hf_tiny import save_tiny

    root = tmp_path_factory.mktemp("hf")
    return {arch: save_tiny(arch, root / arch) for arch in ("BertForSequenceClassification", "LlamaForCausalLM")}


def assert_groups_table(result, name: str) -> None:
    assert result.returncode == 0, result.stderr
    assert f"coupling groups of {name}" in result.stdout, result.stdout
    assert " widened, " in result.stdout and " groups: " in result.stdout, result.stdout


# --- trace on timm: and hf: specs (a fresh process each: import, load, capture) ------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["BertForSequenceClassification", "LlamaForCausalLM"])
def test_trace_hf_model_prints_its_groups(run_cli, hf_dirs, arch):
    assert_groups_table(run_cli("trace", f"hf:{hf_dirs[arch]}"), arch)


@pytest.mark.slow
def test_trace_hf_json_has_the_groups(run_cli, hf_dirs):
    result = run_cli("trace", f"hf:{hf_dirs['BertForSequenceClassification']}", "--json")
    assert result.returncode == 0, result.stderr
    groups = json.loads(result.stdout)["groups"]  # stdout holds the JSON and nothing else
    assert widths_of(groups, pinned=False)[32] >= 1  # the hidden size, widened
    assert all({"id", "width", "pinned", "producers", "consumers"} <= g.keys() for g in groups)


@pytest.mark.slow
def test_trace_timm_model_prints_its_groups(run_cli):
    pytest.importorskip("timm")
    assert_groups_table(run_cli("trace", "timm:resnet10t", "--input-shape", "1,3,32,32"), "resnet10t")


def test_trace_a_missing_hf_folder_is_one_paragraph(run_cli, tmp_path):
    assert_user_error(run_cli("trace", f"hf:{tmp_path / 'no_model'}"), "does not exist", "save_pretrained")


def test_trace_an_hf_folder_without_config_is_one_paragraph(run_cli, tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    assert_user_error(run_cli("trace", f"hf:{tmp_path / 'weights'}"), "no config.json", "model.safetensors")


@pytest.mark.slow
def test_leaf_pins_the_channels_inside_the_submodule(run_cli, write_file):
    write_file("net.py", SEQUENTIAL_FILE)
    free = run_cli("trace", "net.py", "--json")
    assert free.returncode == 0, free.stderr
    assert widths_of(json.loads(free.stdout)["groups"], pinned=False) == {6: 1, 5: 1, 7: 1}
    leaf = run_cli("trace", "net.py", "--leaf", "2", "--json")
    assert leaf.returncode == 0, leaf.stderr
    groups = json.loads(leaf.stdout)["groups"]
    assert 5 not in widths_of(groups, pinned=False)  # the hidden layer inside the leaf stays
    assert any("leaf module '2'" in (g["reason"] or "") for g in groups), groups


# --- hf: models on the command line without what they need ------------------------------------

@pytest.mark.parametrize("command", ["merge", "train"])
def test_hf_commands_refuse_what_a_language_model_cannot_use(hf_dirs, tmp_path, command):
    """merge: hf: teachers are positional, never `-t` weight files; train: a save_pretrained directory
    without a tokenizer cannot read text. One paragraph, exit 2, nothing written."""
    from graphmerge.cli import app

    spec = f"hf:{hf_dirs['LlamaForCausalLM']}"
    out = tmp_path / "out"
    args = {"merge": ["merge", spec, "-t", str(tmp_path / "a.safetensors"), "-t", str(tmp_path / "b.safetensors"),
                      "--data", "sine", "--out", str(out)],
            "train": ["train", spec, "--data", "sine", "--out", str(out)]}[command]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message
    assert ("-t" in message) if command == "merge" else ("tokenizer" in message)
    assert not out.exists()


# --- errors raised deep inside a command ---------------------------------------------------

def test_a_certificate_error_inside_merge_is_one_paragraph(tmp_path, monkeypatch):
    import graphmerge
    from graphmerge.checkpoint import save_weights
    from graphmerge.cli import app
    from graphmerge.examples.mlp import build_model

    def failing_widen(*args, **kwargs):
        raise graphmerge.CertificateError("invariant I1 fails at node 'linear_1':\n  max error 0.5\n  (report it)")

    monkeypatch.setattr(graphmerge, "widen", failing_widen)
    for name in ("a", "b"):
        save_weights(tmp_path / f"{name}.safetensors", build_model())
    result = CliRunner().invoke(app, ["merge", "examples:mlp", "-t", str(tmp_path / "a.safetensors"),
                                      "-t", str(tmp_path / "b.safetensors"), "--data", "sine", "--gate-epochs", "1",
                                      "--finetune-epochs", "0", "--out", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 2, (result.output, result.exception)
    # raised in the preflight, before any training: the message names the pipeline stage
    assert result.stderr.strip() == ("error: the merge pipeline of SineMLP fails at 'widen': CertificateError: "
                                     "invariant I1 fails at node 'linear_1': max error 0.5 (report it)")
    assert not (tmp_path / "s.safetensors").exists()

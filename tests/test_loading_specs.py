"""The ``timm:NAME`` and ``hf:PATH`` model specs of graphmerge.loading.load_model."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from graphmerge.errors import GraphMergeError
from graphmerge.loading import LoadedModel, load_model
from tests.hf_tiny import HF_TINY_ARCHS, save_tiny, tiny_model

# Imported here, once, so no single test pays the imports (seconds each).
try:
    import timm
except ImportError:  # the vision extra is not installed: the timm tests skip
    timm = None
try:
    import transformers
except ImportError:  # the hf extra is not installed: the hf tests skip
    transformers = None


needs_timm = pytest.mark.skipif(timm is None, reason="needs timm: pip install -e '.[vision]'")
needs_hf = pytest.mark.skipif(transformers is None, reason="needs transformers: pip install -e '.[hf]'")


def _run(loaded: LoadedModel):
    with torch.no_grad():
        return loaded.model(*loaded.example_inputs, **loaded.example_kwargs)


def _assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


# --- timm ----------------------------------------------------------------------------------

@needs_timm
def test_timm_spec_builds_with_its_native_input():
    loaded = load_model("timm:resnet18")
    assert (loaded.name, loaded.source, loaded.example_kwargs) == ("resnet18", "timm:resnet18", {})
    (x,) = loaded.example_inputs
    assert x.shape == (2, 3, 224, 224)  # pretrained_cfg["input_size"], batch 2
    assert _run(loaded).shape == (2, 1000)


@needs_timm
def test_timm_input_shape_overrides_and_pretrained_tag():
    loaded = load_model("timm:resnet18.a1_in1k", input_shape=(3, 3, 64, 64))
    assert loaded.example_inputs[0].shape == (3, 3, 64, 64)
    assert _run(loaded).shape == (3, 1000)


@needs_timm
def test_timm_unknown_name_lists_close_matches():
    with pytest.raises(GraphMergeError, match=r"timm has no model named 'resnet1'\. Did you mean .*resnet18"):
        load_model("timm:resnet1")
    with pytest.raises(GraphMergeError, match="No close match"):
        load_model("timm:zzzzqqqq")


def test_timm_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(GraphMergeError, match=r"pip install -e '\.\[vision\]'"):
        load_model("timm:resnet18")


# --- hf ------------------------------------------------------------------------------------

@needs_hf
@pytest.mark.parametrize("arch", ["BertForSequenceClassification", "GPT2LMHeadModel", "LlamaForCausalLM",
                                  "Qwen2ForCausalLM", "ViTForImageClassification"])
def test_hf_spec_loads_saved_weights_and_runs(arch, tmp_path):
    reference = tiny_model(arch, seed=1)
    reference.save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    assert type(loaded.model).__name__ == arch == loaded.name
    assert loaded.source == f"hf:{tmp_path.resolve()}"
    assert not loaded.model.training
    _assert_same_weights(loaded.model, reference)
    (main,) = loaded.example_inputs  # the main input is positional, the rest are keywords
    if arch.startswith("ViT"):
        assert main.shape == (2, 3, 32, 32) and loaded.example_kwargs == {}
    else:
        assert main.shape == (2, 8) and main.dtype == torch.long and int(main.max()) < 100
        assert torch.equal(loaded.example_kwargs["attention_mask"], torch.ones(2, 8, dtype=torch.long))
    causal = arch.endswith("CausalLM") or arch.endswith("LMHeadModel")
    assert loaded.example_kwargs.get("use_cache", None) is (False if causal else None)
    output = _run(loaded)
    with torch.no_grad():
        expected = reference(*loaded.example_inputs, **loaded.example_kwargs)
    torch.testing.assert_close(output.logits, expected.logits)
    if causal:
        assert reference.config.use_cache  # the config is left as shipped; the call turns the cache off
        assert getattr(output, "cache", None) is None and getattr(output, "past_key_values", None) is None


@needs_hf
def test_hf_input_shape_sets_the_main_input(tmp_path):
    loaded = load_model(f"hf:{save_tiny('LlamaForCausalLM', tmp_path)}", input_shape=(3, 5))
    assert loaded.example_inputs[0].shape == (3, 5)
    assert loaded.example_kwargs["attention_mask"].shape == (3, 5)
    assert _run(loaded).logits.shape == (3, 5, 100)


@needs_hf
def test_hf_config_without_architectures_uses_automodel(tmp_path):
    reference = tiny_model("BertForSequenceClassification")
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(f"hf:{tmp_path}")
    assert type(loaded.model).__name__ == "BertModel"
    _assert_same_weights(loaded.model, reference.bert)
    assert _run(loaded).last_hidden_state.shape == (2, 8, 32)


@needs_hf
@pytest.mark.parametrize("arch", HF_TINY_ARCHS)
def test_hf_tiny_archs_load_and_run(arch, tmp_path):
    loaded = load_model(f"hf:{save_tiny(arch, tmp_path)}")
    output = _run(loaded)
    first = output[next(iter(output.keys()))]
    assert first.shape[0] == 2 and torch.isfinite(first).all()


def test_hf_path_missing_or_a_file(tmp_path):
    with pytest.raises(GraphMergeError, match=r"does not exist .*model\.save_pretrained\(PATH\)"):
        load_model(f"hf:{tmp_path / 'nowhere'}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(GraphMergeError, match=r"is a file, not a directory.*save_pretrained\(PATH\)"):
        load_model(f"hf:{tmp_path / 'model.safetensors'}")


def test_hf_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(GraphMergeError, match=r"has no config\.json \(it holds: model\.safetensors\)"
                                              r".*save_pretrained\(PATH\)"):
        load_model(f"hf:{tmp_path}")


def test_hf_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(GraphMergeError, match=r"pip install -e '\.\[hf\]'"):
        load_model(f"hf:{tmp_path}")


@needs_hf
def test_hf_config_without_weights(tmp_path):
    config = tiny_model("LlamaForCausalLM").config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)  # config.json only
    with pytest.raises(GraphMergeError, match=r"loading LlamaForCausalLM from .*save_pretrained"):
        load_model(f"hf:{tmp_path}")


@needs_hf
def test_hf_weights_of_another_model(tmp_path):
    save_tiny("BertForSequenceClassification", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]  # its prediction head is not in the weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GraphMergeError, match=r"do not cover BertForMaskedLM: .*would be random"):
        load_model(f"hf:{tmp_path}")


@needs_hf
def test_hf_unknown_architecture(tmp_path):
    save_tiny("LlamaForCausalLM", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["MyCustomLlama"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GraphMergeError, match=r"names architecture 'MyCustomLlama', which transformers"):
        load_model(f"hf:{tmp_path}")


@needs_hf
def test_hf_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GraphMergeError, match=r"reading .*config\.json raised"):
        load_model(f"hf:{tmp_path}")


def test_unrecognised_spec_mentions_the_new_kinds():
    with pytest.raises(GraphMergeError, match=r"timm:NAME, hf:PATH"):
        load_model("resnet18")

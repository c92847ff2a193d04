"""Tiny Hugging Face models for tests and benchmarks: random weights, built from configs, CPU-fast.

``save_tiny(arch, path)`` builds the class ``arch`` (a transformers class name listed in
``HF_TINY_ARCHS``) from a tiny config (hidden 32-64, 2 layers, 4 heads, vocab 100, 32 px
images), writes it with ``save_pretrained(path)`` and returns ``path``; load it back with the
``hf:PATH`` model spec. Nothing is downloaded. Needs ``transformers>=5`` (the ``hf`` extra).
Import it as ``from tests.hf_tiny import HF_TINY_ARCHS, save_tiny`` from the repository root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 100

# Shared by the decoder-only and encoder text models: attribute names of the Llama/Bert family.
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)
_DECODER = dict(_TEXT, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# class name -> (config class name, config kwargs)
_TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "BertForSequenceClassification": ("BertConfig", dict(_TEXT, type_vocab_size=2, num_labels=3)),
    "RobertaForMaskedLM": ("RobertaConfig", dict(_TEXT, type_vocab_size=1, pad_token_id=1,
                                                 max_position_embeddings=66)),
    "DistilBertForSequenceClassification": ("DistilBertConfig", dict(
        vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64,
        num_labels=3)),
    "GPT2LMHeadModel": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=64, bos_token_id=1, eos_token_id=2)),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", dict(_TEXT)),
    "OPTForCausalLM": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64,
                                         word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2)),
    "LlamaForCausalLM": ("LlamaConfig", dict(_DECODER)),
    "MistralForCausalLM": ("MistralConfig", dict(_DECODER)),
    "Qwen2ForCausalLM": ("Qwen2Config", dict(_DECODER)),
    "Phi3ForCausalLM": ("Phi3Config", dict(_DECODER)),
    "GemmaForCausalLM": ("GemmaConfig", dict(_DECODER, head_dim=8)),
    "FalconForCausalLM": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                                               max_position_embeddings=64, pad_token_id=0,
                                               bos_token_id=1, eos_token_id=2)),
    "T5EncoderModel": ("T5Config", dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                        num_heads=4, relative_attention_num_buckets=8)),
    "ViTForImageClassification": ("ViTConfig", dict(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_labels=5)),
    "SwinForImageClassification": ("SwinConfig", dict(
        image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
        window_size=4, num_labels=5)),
    "ConvNextForImageClassification": ("ConvNextConfig", dict(
        image_size=32, num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)),
}

HF_TINY_ARCHS: list[str] = list(_TINY)
"""The transformers classes ``save_tiny`` builds; each runs a forward on CPU in under a second."""


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """The class ``arch`` built from its tiny config with random weights (seeded), in eval mode."""
    import transformers

    if arch not in _TINY:
        raise KeyError(f"no tiny config for {arch!r}; known: {', '.join(HF_TINY_ARCHS)}")
    config_name, kwargs = _TINY[arch]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, arch)(config).eval()


def save_tiny(arch: str, path: str | Path, seed: int = 0) -> Path:
    """Build ``arch`` from its tiny config, ``save_pretrained`` it into ``path``, return ``path``."""
    path = Path(path)
    tiny_model(arch, seed).save_pretrained(path)
    return path

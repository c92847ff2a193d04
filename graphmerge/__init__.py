"""graphmerge: merge N trained networks of one architecture into one of the same size.

The public API. Each entry point imports its pass lazily so that ``import graphmerge`` stays
cheap and the CLI starts fast.
"""

from __future__ import annotations

from typing import Any

from graphmerge.errors import CertificateError, GraphMergeError, ModelMismatchError, TraceError

__version__ = "0.1.0"

__all__ = [
    "CertificateError",
    "GatePhase",
    "GraphMergeError",
    "ModelMismatchError",
    "Optimizer",
    "TraceError",
    "add_gates",
    "analyze",
    "average_kept_teachers",
    "certify_pipeline",
    "closed_gates_reference",
    "compress",
    "export_onnx",
    "hard_concrete_sample",
    "kept_channels",
    "merge",
    "mosaic",
    "rebasin_average",
    "register_rule",
    "student_certificate",
    "text_dataset",
    "train",
    "weight_average",
    "widen",
    "widen_info",
    "zipit_average",
]


# Entry points that live elsewhere, imported on first use like every entry point here.
_LAZY = {
    "GatePhase": "graphmerge.gate_phase",  # the gate phase's schedule for your own training loop
    "certify_pipeline": "graphmerge.pipeline",  # the whole merge at toy scale, before a long run
    "Optimizer": "graphmerge.optim",  # a weight phase's optimiser: SGD/AdamW, schedule, warmup, clipping
    "hard_concrete_sample": "graphmerge.passes.hard_concrete",  # the gates' training draw (vmapped trainers)
    "widen_info": "graphmerge.passes.ir",  # a big or gated student's record: groups, widths, certificates
    "student_certificate": "graphmerge.api",  # the I3 certificate compress recorded for a student
    "closed_gates_reference": "graphmerge.api",  # what compress must equal: the gated model, dropped gates closed
    "kept_channels": "graphmerge.api",  # per group, the big student's channels compress keeps
    "average_kept_teachers": "graphmerge.passes.rebalance",  # a student's classifier: the mean of the teachers it kept
    "mosaic": "graphmerge.align",  # a student built unit by unit from aligned teachers
    "rebasin_average": "graphmerge.align",  # Git Re-Basin weight matching on the coupling groups, then average
    "zipit_average": "graphmerge.align",  # ZipIt!-style feature matching on the coupling groups, then average
    "weight_average": "graphmerge.alternatives",  # the element-wise mean, BatchNorm statistics recomputed
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'graphmerge' has no attribute {name!r}")


def analyze(model, example_inputs, *, example_kwargs=None, leaf_modules=()):
    """Capture ``model`` on ``example_inputs`` (and ``example_kwargs``) with torch.export and return
    its coupling groups (a GroupSet)."""
    from graphmerge.api import analyze as _analyze

    return _analyze(model, example_inputs, example_kwargs=example_kwargs, leaf_modules=leaf_modules)


def widen(teachers, example_inputs, *, example_kwargs=None, leaf_modules=(), verify=True, groups=None):
    """Concatenate N teachers into one big student that computes the mean of their outputs.

    ``verify`` (default on) certifies that on the example inputs (invariant I1, float64)."""
    from graphmerge.api import widen as _widen

    return _widen(teachers, example_inputs, example_kwargs=example_kwargs, leaf_modules=leaf_modules,
                  verify=verify, groups=groups)


def add_gates(big, **gate_options: Any):
    """Insert one tied hard-concrete gate vector per widened group of a big student."""
    from graphmerge.passes.gate import add_gates as _add_gates

    return _add_gates(big, **gate_options)


def compress(big, keep="gates", *, scales=None, ratio=None, verify=True):
    """Slice a (gated) big student back to the teachers' width; ``verify`` certifies I3."""
    from graphmerge.api import compress as _compress

    return _compress(big, keep, scales=scales, ratio=ratio, verify=verify)


def merge(teachers, train_data, **options: Any):
    """The paper's recipe end to end: widen, gate phase, compress, fine-tune."""
    from graphmerge.recipe import merge as _merge

    return _merge(teachers, train_data, **options)


def train(model, train_data, **options: Any):
    """Train one model (a teacher) in place, resumably; ``optimizer=graphmerge.Optimizer(...)`` for AdamW etc."""
    from graphmerge.recipe import train as _train

    return _train(model, train_data, **options)


def text_dataset(path, tokenizer, block_size=128, **options: Any):
    """A .txt file (or a folder of them) tokenised with a Hugging Face ``tokenizer`` and packed into blocks
    of ``block_size`` tokens: items ``{input_ids, attention_mask, labels}``; ``.split(0.1)`` gives
    (train, val). ``objective="masked_lm"`` masks tokens as BERT (see graphmerge.text_data)."""
    from graphmerge.text_data import text_dataset as _text_dataset

    return _text_dataset(path, tokenizer, block_size, **options)


def export_onnx(model, example_inputs, path, **options: Any):
    """Export a model to a self-contained ONNX file, checked for parity with onnxruntime."""
    from graphmerge.passes.export import export_onnx as _export_onnx

    return _export_onnx(model, example_inputs, path, **options)


def register_rule(op, rule, *, linear=False):
    """Teach the analysis an ATen op it lacks: ``op`` an OpOverload or OpOverloadPacket
    (``torch.ops.mylib.myop``), ``rule`` a ``graphmerge.passes.registry.OpRule`` or a function
    ``(prop, node) -> labels`` (see docs/design.md, "Adding an op")."""
    from graphmerge.passes.registry import register_rule as _register_rule

    _register_rule(op, rule, linear=linear)

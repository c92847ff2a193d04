"""Hugging Face models on the command line: ``hf:DIR`` teachers, text data, ``save_pretrained`` output.

``graphmerge train hf:DIR --data text:PATH --out OUT`` and ``graphmerge merge hf:A hf:B ... --data
text:PATH --out OUT`` go through :func:`prepare_train` / :func:`prepare_merge`, which check every
input before any training and return an :class:`HFRun`: the models, their tokenizer, the data
(:mod:`graphmerge.text_data`, tokenised with teacher 0's tokenizer) and the loss the model's head
calls for. ``HFRun.save`` writes the trained model or the student as ``save_pretrained`` does
(``config.json``, ``model.safetensors``, ``generation_config.json`` for generative models) plus the
teachers' tokenizer, into a temporary directory beside ``OUT`` that is renamed into place only once
the written model has been loaded back with ``from_pretrained`` and every tensor compared (no
missing, unexpected or differing key: the strict round trip of the student's state dict).

The objective follows the model's head, as transformers registers it (no architecture is named
here): a class in transformers' causal-LM mapping trains on next-token prediction
(``loss="causal_lm"``), one in its masked-LM mapping on BERT's masked tokens
(:func:`graphmerge.text_data.masked_lm`); other heads are refused for text data.

:func:`positional_model` makes an hf model callable with positional tensors (``input_ids``,
``attention_mask``) for the benchmark, and :func:`export_hf_onnx` exports it to ONNX with those input
names, the batch and (for text) the sequence length dynamic, checked with onnxruntime against torch.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphmerge.errors import GraphMergeError
from graphmerge.passes.export import ExportResult
from graphmerge.passes.onnx_checks import BatchParity
from graphmerge.passes.util import check_teacher_count, eval_mode, one_line

__all__ = ["HFExportResult", "HFRun", "PositionalModel", "config_differences", "export_hf_onnx", "load_tokenizer",
           "max_positions", "objective_of", "perplexity", "positional_model", "prepare_merge", "prepare_train",
           "save_pretrained_atomic", "teachers_form"]

#: config keys that say nothing about the network (where it was saved, with which library version)
CONFIG_KEYS_IGNORED = ("transformers_version",)


@dataclass
class HFRun:
    """What a ``train`` or ``merge`` command needs from its ``hf:`` models, checked and loaded."""

    specs: list[str]
    models: list[nn.Module]
    tokenizer: Any
    train_data: Any
    val_data: Any
    loss: str | Callable[..., torch.Tensor]
    objective: str
    out: Path

    @property
    def names(self) -> list[str]:
        return [Path(spec.removeprefix("hf:")).name for spec in self.specs]

    def save(self, model: nn.Module) -> Path:
        """Write ``model`` and the tokenizer to ``out`` (atomically, checked by reloading)."""
        return save_pretrained_atomic(model, self.tokenizer, self.out)

    def perplexity_line(self, summary: dict[str, Any]) -> str:
        """The merge's losses as perplexities (exp of the mean loss per token on the validation split)."""
        rows = [f"teacher {name} {_ppl(value)}" for name, value in zip(self.names, summary["teachers"], strict=True)]
        rows += [f"big student {_ppl(summary['big'])}",
                 f"student before fine-tuning {_ppl(summary['before_finetune'])}",
                 f"student after fine-tuning {_ppl(summary['after_finetune'])}"]
        what = "masked tokens" if self.objective == "masked_lm" else "next tokens"
        return f"perplexity ({what}, {'validation' if self.val_data is not None else 'training'} text): " + \
            ", ".join(rows)


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy per token), the language-model figure (capped where exp overflows)."""
    return math.exp(min(float(loss), 700.0))


def _ppl(loss: float) -> str:
    return f"{perplexity(loss):.3f}"


# --- commands' inputs ------------------------------------------------------------------------

def is_hf_spec(spec: str) -> bool:
    return spec.startswith("hf:")


def prepare_train(spec: str, data: str, out: Path, block_size: int | None) -> HFRun:
    """Check and load ``graphmerge train hf:DIR``'s inputs (see the module docstring)."""
    check_out_dir(out, "train")
    loaded = _load(spec)
    tokenizer = load_tokenizer(spec)
    return _finish([spec], [loaded.model], tokenizer, data, out, block_size)


def teachers_form(specs: Sequence[str], teacher_files: Sequence[Path]) -> bool:
    """Which form ``graphmerge merge`` was given: True for ``hf:DIR`` teachers given positionally, False for
    one model spec with ``-t WEIGHTS`` files. Refuses the two mixed, before anything is loaded."""
    hf_specs = [s for s in specs if is_hf_spec(s)]
    if not hf_specs:
        if len(specs) > 1:
            raise GraphMergeError(f"graphmerge merge got {len(specs)} model specs ({', '.join(specs)}); several "
                                  f"positional teachers are for hf: directories only. For other models pass one "
                                  f"architecture spec and each teacher's weights with -t: graphmerge merge "
                                  f"{specs[0]} -t A.safetensors -t B.safetensors.")
        return False
    if teacher_files:
        raise GraphMergeError(f"graphmerge merge got hf: teachers ({', '.join(hf_specs)}) and -t/--teacher weight "
                              f"files ({', '.join(map(str, teacher_files))}); use one form. hf: teachers are "
                              f"whole save_pretrained directories, each given positionally (graphmerge merge "
                              f"hf:A hf:B --data text:PATH --out DIR), so drop -t; -t WEIGHTS is for one "
                              f"architecture spec (a model file, torchvision:, timm:) with its teachers' weights.")
    if len(hf_specs) != len(specs):
        others = [s for s in specs if not is_hf_spec(s)]
        raise GraphMergeError(f"graphmerge merge got hf: teachers and other model specs ({', '.join(others)}); "
                              f"every teacher must be an hf:DIR written by save_pretrained, of one architecture.")
    return True


def prepare_merge(specs: Sequence[str], data: str, out: Path | None, block_size: int | None) -> HFRun:
    """Check and load ``graphmerge merge hf:A hf:B ...``'s inputs (see the module docstring)."""
    check_teacher_count(len(specs), f"pass each teacher's directory: graphmerge merge {specs[0]} hf:OTHER "
                                    f"--data {data} --out DIR.")
    out = out if out is not None else Path("student")
    check_out_dir(out, "merge")
    loaded = [_load(spec) for spec in specs]
    tokenizers = [load_tokenizer(spec) for spec in specs]
    for spec, item in zip(specs[1:], loaded[1:], strict=True):
        differences = config_differences(loaded[0].model.config, item.model.config)
        if differences:
            raise GraphMergeError(f"the teachers {specs[0]} and {spec} have different configs "
                                  f"({'; '.join(differences)}). Merging needs teachers of one architecture and "
                                  f"size: train each from the same config (only their weights may differ).")
    for spec, tokenizer in zip(specs[1:], tokenizers[1:], strict=True):
        if tokenizer.get_vocab() != tokenizers[0].get_vocab():
            raise GraphMergeError(f"the teachers {specs[0]} and {spec} have different tokenizers (their vocabularies "
                                  f"differ), so the same token id means different text to them. Train the teachers "
                                  f"with one tokenizer and save it into each directory.")
    return _finish(list(specs), [item.model for item in loaded], tokenizers[0], data, out, block_size)


def check_out_dir(out: Path, command: str) -> None:
    """``--out`` for an hf model is a directory: new, empty, or an earlier save_pretrained output."""
    out = out.expanduser()
    parent = out.absolute().parent
    fix = "choose another --out"
    if out.suffix == ".safetensors":
        raise GraphMergeError(f"--out {out}: graphmerge {command} writes an hf: model as a save_pretrained directory "
                              f"(config, weights and tokenizer), not a single .safetensors file; {fix}, a "
                              f"directory such as {out.with_suffix('')}.")
    if not parent.is_dir():
        raise GraphMergeError(f"cannot write {out}: folder {parent} does not exist. Create it first or {fix}.")
    if out.exists() and not out.is_dir():
        raise GraphMergeError(f"--out {out} is a file; an hf: model is written as a directory. Remove it or {fix}.")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise GraphMergeError(f"--out {out} is a directory holding other files and no config.json, so it is not an "
                              f"earlier model output that may be replaced. Empty it or {fix}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GraphMergeError(f"cannot write {out}: folder {parent} is not writable; {fix}.")


def load_tokenizer(spec: str) -> Any:
    """``AutoTokenizer.from_pretrained(DIR, local_files_only=True)``, or one paragraph saying how to add one.

    transformers builds an empty tokenizer of the config's model type when the directory has no
    tokenizer files, so their presence is checked: ``tokenizer_config.json``, ``tokenizer.json`` or
    the vocabulary files the tokenizer class reads (``vocab_files_names``)."""
    path = Path(spec.removeprefix("hf:")).expanduser()
    if not path.is_dir():
        raise GraphMergeError(f"{spec}: {path} is not a directory. hf:DIR names a directory written by "
                              f"model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR).")
    tokenizer, error = None, "no tokenizer files"
    try:
        from transformers import AutoTokenizer

        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # unreadable tokenizer files, or none and no type to fall back on
        error = one_line(exc, 200)
    files = {"tokenizer_config.json", "tokenizer.json", *getattr(tokenizer, "vocab_files_names", {}).values()}
    if tokenizer is None or not any((path / name).is_file() for name in files):
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise GraphMergeError(f"{spec} has no tokenizer ({error}; the directory holds {found}). Text data is "
                              f"tokenised with the teachers' tokenizer and the output is written with it: save the "
                              f"tokenizer the model was trained with into that directory, "
                              f"tokenizer.save_pretrained('{path}').")
    return tokenizer


def config_differences(first: Any, second: Any) -> list[str]:
    """``"key a vs b"`` for every config key whose value differs (library bookkeeping keys ignored)."""
    a, b = first.to_dict(), second.to_dict()
    keys = sorted(k for k in set(a) | set(b) if not k.startswith("_") and k not in CONFIG_KEYS_IGNORED)
    missing = object()
    return [f"{k} {a.get(k, 'unset')!r} vs {b.get(k, 'unset')!r}" for k in keys
            if a.get(k, missing) != b.get(k, missing)]


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover (``max_position_embeddings``)."""
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def objective_of(model: nn.Module) -> str:
    """``"causal_lm"`` or ``"masked_lm"`` from transformers' own head registries, or a refusal."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__

    def listed(mapping: dict[str, Any]) -> bool:
        return any(name == v or (isinstance(v, (tuple, list)) and name in v) for v in mapping.values())

    if listed(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return "causal_lm"
    if listed(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        return "masked_lm"
    raise GraphMergeError(f"graphmerge train and merge train hf: models as language models, and {name} is neither a "
                          f"causal LM nor a masked LM in transformers' registries (its head predicts something else "
                          f"than tokens). Save the model with a language-model head (AutoModelForCausalLM / "
                          f"AutoModelForMaskedLM), or merge it from Python: graphmerge.merge(teachers, dataset, "
                          f"loss=...) with a dataset of dicts holding its inputs and labels.")


# --- data ----------------------------------------------------------------------------------

def _finish(specs: list[str], models: list[nn.Module], tokenizer: Any, data: str, out: Path,
            block_size: int | None) -> HFRun:
    from graphmerge import text_data

    model = models[0]
    objective = objective_of(model)
    limit = max_positions(model.config)
    if block_size is None:
        block_size = min(text_data.DEFAULT_BLOCK_SIZE, limit or text_data.DEFAULT_BLOCK_SIZE)
    elif limit is not None and block_size > limit:
        raise GraphMergeError(f"--block-size {block_size} is longer than {specs[0]} can read: its position embeddings "
                              f"cover {limit} tokens (config max_position_embeddings). Pass --block-size {limit} or "
                              f"less.")
    if data.startswith("text:"):
        # masks seeded by the text alone (seed 0), so every command validates on the same masked tokens
        blocks = text_data.text_dataset(data.removeprefix("text:"), tokenizer, block_size, objective=objective)
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and int(blocks.blocks.max()) >= vocab:
            raise GraphMergeError(f"the tokenizer of {specs[0]} produces token id {int(blocks.blocks.max())}, but the "
                                  f"model's vocab_size is {vocab}: tokenizer and model do not belong together. Save "
                                  f"the tokenizer the model was built for (len(tokenizer) <= vocab_size).")
        if vocab is not None and blocks.vocab_size is not None:
            blocks.vocab_size = min(blocks.vocab_size, vocab)  # random replacement tokens of the masked LM
        train, val = blocks.split(0.1)
    else:
        train, val = _dict_data(data)
    _check_runs(model, train, specs[0], data)
    loss: str | Callable[..., torch.Tensor] = "causal_lm" if objective == "causal_lm" else text_data.masked_lm
    return HFRun(specs=specs, models=models, tokenizer=tokenizer, train_data=train, val_data=val, loss=loss,
                 objective=objective, out=out.expanduser())


def _dict_data(spec: str) -> tuple[Any, Any]:
    from collections.abc import Mapping

    from graphmerge.data import load_data

    train, val, _, _ = load_data(spec)
    first = train.dataset[0] if hasattr(train, "dataset") else train[0]
    if not isinstance(first, Mapping) or "input_ids" not in first or "labels" not in first:
        raise GraphMergeError(f"--data {spec} yields {type(first).__name__} items, and an hf: language model trains on "
                              f"dicts with input_ids and labels (and attention_mask). Use text:PATH (a .txt file "
                              f"or folder, tokenised with the model's tokenizer) or make the data file's datasets "
                              f"return such dicts.")
    return train, val


def _check_runs(model: nn.Module, data: Any, spec: str, data_spec: str) -> None:
    """Run the model on the first two samples, so a mismatch fails before training, in one paragraph."""
    from graphmerge.data import first_example

    _, kwargs = first_example(data)
    try:
        with eval_mode(model), torch.no_grad():
            logits = getattr(model(**kwargs), "logits", None)
    except Exception as exc:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in kwargs.items())
        raise GraphMergeError(f"the model {spec} cannot run on the data {data_spec}: a batch of {shapes} gave "
                              f"{one_line(exc)}. Use a smaller --block-size or data that matches the model.") from exc
    if not isinstance(logits, torch.Tensor):
        raise GraphMergeError(f"the model {spec} returns no logits on the data {data_spec}; training needs a model "
                              f"with a language-model head (AutoModelForCausalLM or AutoModelForMaskedLM).")


# --- output --------------------------------------------------------------------------------

def save_pretrained_atomic(model: nn.Module, tokenizer: Any, out: str | Path) -> Path:
    """``model.save_pretrained`` + ``tokenizer.save_pretrained`` into ``out`` as one step: written to a
    temporary directory beside ``out``, loaded back with ``from_pretrained`` and compared tensor by
    tensor, then renamed into place (an earlier output at ``out`` is replaced only then)."""
    out = Path(out).expanduser().absolute()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with _quiet_transformers():
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        check_round_trip(model, tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_round_trip(model: nn.Module, directory: Path) -> None:
    """The model saved in ``directory`` loads into its class with nothing missing, unexpected or resized,
    and holds bitwise the tensors of ``model.state_dict()``."""
    from graphmerge.loading import _from_pretrained

    with _quiet_transformers():
        reloaded = _from_pretrained(type(model), directory)
    from safetensors import safe_open

    expected, got = model.state_dict(), reloaded.state_dict()
    written = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            written.update(handle.keys())
    differing = sorted((set(expected) ^ set(got)) | (written - set(expected))) or [
        k for k in expected if not torch.equal(expected[k].detach().cpu(), got[k].detach().cpu())]
    if differing:
        raise GraphMergeError(f"the model written to {directory} does not load back as it was saved: "
                              f"{len(differing)} tensors differ ({', '.join(differing[:5])}). This is a bug in "
                              f"graphmerge's Hugging Face output; please report it with the model's config.json.")


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers() -> Any:
    """No progress bars or info chatter from transformers while it loads or saves for us."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load(spec: str) -> Any:
    from graphmerge.loading import load_model

    return load_model(spec)


# --- positional calls ------------------------------------------------------------------------

class PositionalModel(nn.Module):
    """An hf model called with its tensor inputs positionally, in ``names`` order (the other keywords
    fixed), returning its logits (or its first output tensor): what ONNX export and the benchmark
    run. The wrapped model is ``self.model``, so the state dict keys gain a ``model.`` prefix."""

    def __init__(self, model: nn.Module, names: Sequence[str], fixed: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model, self.names, self.fixed = model, list(names), dict(fixed or {})

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        output = self.model(**dict(zip(self.names, tensors, strict=True)), **self.fixed)
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
        return output if isinstance(output, torch.Tensor) else output[0]


def positional_model(loaded: Any) -> tuple[PositionalModel, tuple[torch.Tensor, ...], list[str]]:
    """``(wrapper, example tensors, their names)`` for a ``graphmerge.loading.LoadedModel`` of an hf model:
    the main input (``input_ids`` / ``pixel_values``) and the tensor keywords (``attention_mask``)
    become positional inputs; other keywords (``use_cache=False``) stay fixed."""
    import inspect

    params = [n for n, p in inspect.signature(loaded.model.forward).parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    tensors = dict(zip(params, loaded.example_inputs, strict=False))
    tensors.update({k: v for k, v in loaded.example_kwargs.items() if isinstance(v, torch.Tensor)})
    fixed = {k: v for k, v in loaded.example_kwargs.items() if not isinstance(v, torch.Tensor)}
    names = list(tensors)
    return PositionalModel(loaded.model, names, fixed).eval(), tuple(tensors.values()), names


# --- ONNX ----------------------------------------------------------------------------------

@dataclass
class HFExportResult(ExportResult):
    """:class:`~graphmerge.passes.export.ExportResult` plus the inputs' names, which of their axes are
    dynamic, and the (batch, sequence) shapes parity was checked at."""

    input_names: list[str] = field(default_factory=list)
    dynamic_axes: dict[str, list[str]] = field(default_factory=dict)
    checked_shapes: list[tuple[int, ...]] = field(default_factory=list)


def export_hf_onnx(loaded: Any, path: str | Path, *, opset: int | None = None, tolerance: float = 1e-4,
                   dynamic: bool = True) -> HFExportResult:
    """Export an hf model (a ``graphmerge.loading.LoadedModel`` of ``hf:DIR``) to one ONNX file whose inputs are
    named as the model's (``input_ids``, ``attention_mask``) and whose output is ``logits``; with ``dynamic``
    the batch and, for token inputs, the sequence axis are symbolic (up to the model's max positions).
    onnxruntime runs the file on the example batch and on a batch one larger and five tokens longer whose
    first row is right-padded (its last two mask entries 0); a max abs error over max(1, max|torch|) above
    ``tolerance`` raises, and nothing is left at ``path`` on any failure."""
    from graphmerge.passes import export as onnx_export
    from graphmerge.passes import onnx_checks

    target = onnx_export._check_target(Path(path))
    wrapper, inputs, names = positional_model(loaded)
    text = names[0] == "input_ids"
    limit = max_positions(getattr(loaded.model, "config", None)) if text else None
    inputs = tuple(x.repeat(2, *([1] * (x.dim() - 1))) if x.shape[0] == 1 else x for x in inputs)
    axes = {n: (["batch", "sequence"] if text and x.dim() >= 2 else ["batch"]) for n, x in zip(names, inputs,
                                                                                                strict=True)}
    feeds = [inputs] + ([_longer_batch(inputs, names, limit)] if dynamic else [])
    with eval_mode(wrapper):
        tmpdir = onnx_export._make_tmpdir(target)
        try:
            tmp_path = tmpdir / target.name
            _export_dynamo(wrapper, inputs, names, axes if dynamic else {}, limit, tmp_path, opset)
            side = onnx_export._side_file(tmp_path)
            proto = onnx_checks.validate(tmp_path)
            _check_axes_dynamic(proto, axes if dynamic else {})
            parity = _parity(wrapper, feeds, names, tmp_path, tolerance)
            size = tmp_path.stat().st_size + (side.stat().st_size if side else 0)
            final_side = onnx_export._commit(tmp_path, side, target)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return HFExportResult(path=target, exporter="dynamo", opset=onnx_checks.opset_of(proto), size_bytes=size,
                          dynamic_batch=dynamic, tolerance=tolerance, side_file=final_side, parity=parity,
                          input_names=names, dynamic_axes=axes if dynamic else {},
                          checked_shapes=[tuple(feed[0].shape) for feed in feeds])


def _longer_batch(inputs: tuple[torch.Tensor, ...], names: list[str], limit: int | None) -> tuple[torch.Tensor, ...]:
    """One more sample and, for tokens, five more positions (within ``limit``); the first row's last two
    attention-mask entries 0 (right padding), so the mask input is exercised."""
    from graphmerge.passes.onnx_checks import batch_like

    batch = inputs[0].shape[0] + 1
    if names[0] != "input_ids":
        return batch_like(inputs, batch, seed=1)
    length = inputs[0].shape[1] + 5 if limit is None else min(limit, inputs[0].shape[1] + 5)
    generator = torch.Generator().manual_seed(1)
    high = int(inputs[0].max()) + 1
    out = []
    for name, x in zip(names, inputs, strict=True):
        if name == "attention_mask":
            mask = torch.ones(batch, length, dtype=x.dtype)
            mask[0, -2:] = 0
            out.append(mask)
        elif x.dim() >= 2 and not x.is_floating_point():
            out.append(torch.randint(0, max(high, 2), (batch, length, *x.shape[2:]), generator=generator,
                                     dtype=x.dtype))
        else:
            out.append(batch_like((x,), batch, seed=1)[0])
    return tuple(out)


def _export_dynamo(wrapper: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str],
                   axes: dict[str, list[str]], limit: int | None, tmp_path: Path, opset: int | None) -> None:
    from graphmerge.passes import onnx_exporters

    dims = {"batch": torch.export.Dim("batch", min=1),
            "sequence": torch.export.Dim("sequence", min=1, max=limit) if limit else torch.export.Dim("sequence")}
    dynamic_shapes = ((tuple({i: dims[axis] for i, axis in enumerate(axes[n])} for n in names),) if axes else None)
    try:
        with onnx_exporters.quiet():
            program = torch.onnx.export(wrapper, inputs, None, dynamo=True, verbose=False, opset_version=opset,
                                        dynamic_shapes=dynamic_shapes, input_names=names, output_names=["logits"],
                                        optimize=True)
            program.save(str(tmp_path), external_data=False)
    except Exception as exc:
        raise GraphMergeError(f"ONNX export of the hf model failed: {onnx_exporters.summarize(exc)}. Try another "
                              f"--opset, or --no-dynamic-batch to fix the batch and sequence length to the "
                              f"example's (2, 8).") from exc


def _check_axes_dynamic(proto: Any, axes: dict[str, list[str]]) -> None:
    for value in proto.graph.input:
        fixed = [axis for axis, dim in zip(axes.get(value.name, []), value.type.tensor_type.shape.dim, strict=False)
                 if dim.HasField("dim_value")]
        if fixed:
            raise GraphMergeError(f"the exported ONNX input {value.name!r} has its {' and '.join(fixed)} axis "
                                  f"fixed: the model's forward specialises it (a literal size in a view or a "
                                  f"position table). Export with --no-dynamic-batch, or report the model.")


def _parity(wrapper: nn.Module, feeds: list[tuple[torch.Tensor, ...]], names: list[str], tmp_path: Path,
            tolerance: float) -> list[BatchParity]:
    from graphmerge.passes import onnx_checks

    session = onnx_checks.ort_session(tmp_path)
    results = []
    for feed in feeds:
        with torch.no_grad():
            reference = onnx_checks.flatten_outputs(wrapper(*feed))
        got = session.run(None, {n: x.numpy() for n, x in zip(names, feed, strict=True)})
        max_abs, max_rel = onnx_checks.parity_error(reference, got)
        results.append(BatchParity(batch=int(feed[0].shape[0]), max_abs=max_abs, max_rel=max_rel))
    worst = max(results, key=lambda p: p.max_rel)
    if not worst.max_rel <= tolerance:
        shapes = "; ".join(f"shape {tuple(f[0].shape)}: max abs {p.max_abs:.3g}, max rel {p.max_rel:.3g}"
                           for f, p in zip(feeds, results, strict=True))
        raise GraphMergeError(f"onnxruntime disagrees with torch beyond tolerance {tolerance:g} ({shapes}; relative to "
                              f"max(1, max|torch logits|)). The ONNX file was not written. Try another --opset, or a "
                              f"looser --tolerance if the model is in reduced precision.")
    return results

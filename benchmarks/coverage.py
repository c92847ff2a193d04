"""Coverage benchmark: which models of torchvision, timm and Hugging Face graphmerge merges, and how
Torch-Pruning fares on the same models in the same run.

Per model (two teachers with different random weights, every floating tensor perturbed so that
they differ everywhere, BatchNorm statistics included):

- capture: does ``torch.export`` capture it (else the error's first line, and the stage that failed:
  capture, analysis (couple), widen, certify);
- groups: how many, how many pinned inside the network (then I1 cannot hold) and the first two reasons;
- I1: the big student's certificate (relative error, dtype) from ``graphmerge.widen(verify=True)``;
- I2: ``compress(big, "teacher:0")``; every state_dict tensor equals teacher 0's, or teacher 0's / 2
  (the averaging head's weight), or the teachers' mean (its bias), computed here;
- I4: the student is the teachers' class and a fresh instance loads its state_dict with strict=True;
- merged end to end: ``graphmerge.pipeline.certify_pipeline`` on the big student built above (not
  widened again) with batch sizes (3, 1): ok, or the stage that fails and its error's first line;
  the I3 certificate of the student compressed by the gates (relative error, or why it was
  skipped), the gates-follow-samples error and the pipeline's time. A model widen refuses (any
  error, I1/I2 certificates included) gets no pipeline run: the row says why;
- ONNX: ``export_onnx_report`` of the compressed student (onnxruntime parity at two batch sizes);
- times per stage: capture, couple, widen, certify (from ``groups.timings``), compress (timed here,
  I3 certificate included), the pipeline, ONNX;
- Torch-Pruning: ``DependencyGraph().build_dependency`` ok, then ``MagnitudePruner`` (L2 magnitude,
  pruning_ratio 0.5, the output layer ignored, ``num_heads`` given for attention modules that
  expose it) ``step()`` ok, and whether a forward then runs.

Each model runs in a forked worker with a timeout (``--timeout-per-model``), so one hang or crash
does not stop the sweep. Results merge into the JSON by suite/model, so several runs (chunks of
``--models``) accumulate; the JSON is written atomically after every model and the markdown
table (benchmarks/results/coverage.md) is rebuilt from all rows.

    python benchmarks/coverage.py --quick                    # 3 small models per suite, no ONNX
    python benchmarks/coverage.py --suite hf
    python benchmarks/coverage.py --suite timm --time-budget 1500 --skip-done
    python benchmarks/coverage.py --suite timm --models vit_tiny_patch16_224,convnext_atto
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import inspect
import json
import multiprocessing
import os
import pathlib
import platform
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from graphmerge.pipeline import perturb

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The repository root instead of this script's folder: benchmarks/coverage.py must not shadow the
# ``coverage`` package for any library that imports it.
if sys.path and pathlib.Path(sys.path[0] or ".").resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "coverage.json"
SUITES = ("torchvision", "timm", "hf")
PARAM_CAP = 300_000_000
N_TEACHERS = 2
BATCH = 2
I1_EXACT = 1e-6

# -- model sets ---------------------------------------------------------------------------------

# The smallest variant of each timm family (family: the name's leading letters; smallest by
# parameter count, from timm 1.0.31's registry built on the meta device), the 13 models the
# transformers issue names first. Left out: ports (tf_*), models above ~90 M parameters or with
# inputs above 300 px (aimv2, beit, deepseek_vit, gemma4_vit, naflexvit, nasnet, pnasnet, qwen3_vit,
# sam2, samvit, senet154, seresnextaa101d, csatv2, vgg, wide_resnet).
TIMM_MODELS: list[str] = [
    # named in the issue
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "convnext_atto",
    "edgenext_xx_small", "efficientformer_l1", "levit_128s", "coatnet_nano_rw_224", "mobilevit_xxs",
    "poolformer_s12", "ghostnet_100", "mixer_s16_224", "resmlp_12_224",
    # CNNs
    "resnet10t", "resnetv2_18", "seresnet18", "skresnet18", "resnetblur18", "resnetaa34d", "resnest14d",
    "ecaresnet26t", "ecaresnext26t_32x4d", "res2next50", "resnext26ts", "seresnext26ts", "eca_resnext26ts",
    "gcresnext26ts", "bat_resnext26ts", "gcresnet33ts", "gernet_s", "regnetx_002", "regnety_002",
    "regnetz_005", "densenet121", "densenetblur121d", "dla46x_c", "dpn48b", "cs3darknet_focus_s",
    "cspnext_tiny", "cspresnet50", "cspresnext50", "cspdarknet53", "darknet17", "sedarknet21",
    "hrnet_w18_small", "selecsls42", "ese_vovnet19b_slim_dw", "vovnet39a", "xception41p", "tresnet_m",
    "nf_regnet_b0", "nfnet_l0", "hgnet_tiny", "hgnetv2_b0", "repvgg_a0", "mobileone_s1",
    "rexnet_100", "rexnetr_100", "dm_nfnet_f0",
    # mobile CNNs
    "efficientnet_lite0", "efficientnetv2_rw_t", "gc_efficientnetv2_rw_t", "mobilenetv3_small_050",
    "mobilenet_edgetpu_100", "mnasnet_small", "semnasnet_050", "spnasnet_100", "mixnet_s", "fbnetc_100",
    "fbnetv3_b", "hardcorenas_b", "tinynet_e", "lcnet_035", "lcnetv2_small", "ghostnetv3_050",
    "repghostnet_050", "repvit_m1", "fasternet_t0", "starnet_s050", "mobilevitv2_050",
    # ConvNeXt-likes and MetaFormers
    "convnextv2_atto", "inception_next_atto", "rdnet_tiny", "mambaout_femto", "caformer_s18",
    "convformer_s18", "poolformerv2_s12", "fastvit_t8", "convmixer_768_32", "sequencer2d_s",
    # attention CNN hybrids
    "botnet26t_256", "halonet_h1", "lambda_resnet26t", "sehalonet33ts", "haloregnetz_b",
    "efficientvit_m0", "efficientvim_m1", "efficientformerv2_s0", "lowformer_b0", "iformer_t", "shvit_s1",
    "swiftformer_xs", "cpubone_nano", "tiny_vit_5m_224", "nextvit_small", "visformer_tiny",
    "maxvit_pico_rw_256", "maxxvit_rmlp_nano_rw_256", "maxxvitv2_nano_rw_256", "coatnext_nano_rw_224",
    # vision transformers and MLPs
    "eva02_tiny_patch14_224", "cait_xxs24_224", "coat_tiny", "convit_tiny", "crossvit_tiny_240",
    "pit_ti_224", "xcit_nano_12_p8_224", "tnt_s_legacy_patch16_224", "twins_svt_small", "pvt_v2_b0",
    "nest_tiny", "gcvit_xxtiny", "davit_tiny", "focalnet_tiny_srf", "hiera_tiny_224", "hieradet_small",
    "mvitv2_tiny", "volo_d1_224", "swinv2_cr_tiny_224", "flexivit_small", "vitamin_small_224",
    "gmlp_ti16_224", "gmixer_12_224", "vit_tiny_patch16_dinov3_qkvb",
]

QUICK = {
    "torchvision": ["resnet18", "mobilenet_v3_small", "mnasnet0_5"],
    "timm": ["resnet10t", "convnext_atto", "vit_tiny_patch16_224"],
    "hf": ["BertForSequenceClassification", "LlamaForCausalLM", "ViTForImageClassification"],
}


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def hf_models() -> list[str]:
    from tests.hf_tiny import HF_TINY_ARCHS

    return list(HF_TINY_ARCHS)


def suite_models(suite: str) -> list[str]:
    return {"torchvision": torchvision_models, "timm": lambda: list(TIMM_MODELS), "hf": hf_models}[suite]()


def model_spec(suite: str, name: str) -> tuple[Callable[[int], nn.Module], tuple, dict]:
    """(build(seed) -> eval-mode model, example inputs, example kwargs) of one model."""
    generator = torch.Generator().manual_seed(0)
    if suite == "torchvision":
        import torchvision

        size = 224 if name.startswith(("vit_", "maxvit")) else 96 if name == "inception_v3" else 64

        def build(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return perturb(torchvision.models.get_model(name, weights=None), seed)

        return build, (torch.randn(BATCH, 3, size, size, generator=generator),), {}
    if suite == "timm":
        import timm

        def build(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            return perturb(timm.create_model(name, pretrained=False), seed)

        with torch.device("meta"):
            size = tuple(timm.create_model(name, pretrained=False).pretrained_cfg["input_size"])
        return build, (torch.randn(BATCH, *size, generator=generator),), {}
    if suite == "hf":
        from tests.hf_tiny import tiny_model

        def build(seed: int) -> nn.Module:
            return perturb(tiny_model(name, seed), seed)

        if "Image" in name:
            return build, (torch.randn(BATCH, 3, 32, 32, generator=generator),), {}
        ids = torch.randint(3, 100, (BATCH, 8), generator=generator)
        return build, (ids,), {"attention_mask": torch.ones(BATCH, 8, dtype=torch.long)}
    raise ValueError(f"unknown suite {suite!r}")


def meta_params(suite: str, name: str) -> int | None:
    """Parameter count without allocating (the model built on the meta device), or None."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if suite == "torchvision":
                import torchvision

                model = torchvision.models.get_model(name, weights=None)
            elif suite == "timm":
                import timm

                model = timm.create_model(name, pretrained=False)
            else:
                return None
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


# -- one model ----------------------------------------------------------------------------------

def first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:limit]


def float_leaves(output: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def output_layer(model: nn.Module, inputs: tuple, kwargs: dict) -> nn.Module | None:
    """The last Conv/Linear the forward runs (the layer writing the logits)."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, *_: order.append(mod))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1] if order else None


def check_i2(student: nn.Module, teachers: list[nn.Module]) -> dict[str, Any]:
    """Bitwise: teacher 0's tensor, or teacher 0's / N, or the teachers' (correctly rounded) mean."""
    n = len(teachers)
    got = student.state_dict()
    states = [t.state_dict() for t in teachers]
    own = states[0]
    counts = {"teacher": 0, "divided": 0, "mean": 0}
    bad = [f"missing {k}" for k in own if k not in got] + [f"extra {k}" for k in got if k not in own]
    for key, value in got.items():
        if key not in own:
            continue
        ref = own[key]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            bad.append(f"{key}: {tuple(value.shape)} {value.dtype} vs {tuple(ref.shape)} {ref.dtype}")
        elif torch.equal(value, ref):
            counts["teacher"] += 1
        elif value.is_floating_point() and torch.equal(value, ref / n):
            counts["divided"] += 1
        elif value.is_floating_point() and torch.equal(
                value, torch.stack([s[key].double() for s in states]).mean(0).to(value.dtype)):
            counts["mean"] += 1
        else:
            bad.append(key)
    return {"i2_ok": not bad, "i2_counts": counts, "i2_bad": bad[:3], "i2_bad_count": len(bad)}


class _KwargsForward(nn.Module):
    """model(**dict(zip(names, args)), **fixed) returning its floating output leaves as a tuple:
    positional tensors for the ONNX exporter (Hugging Face forwards take keywords)."""

    def __init__(self, model: nn.Module, names: list[str], fixed: dict[str, Any]):
        super().__init__()
        self.model, self.names, self.fixed = model, names, fixed

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(float_leaves(self.model(**dict(zip(self.names, args, strict=True)), **self.fixed)))


def onnx_row(student: nn.Module, suite: str, inputs: tuple, kwargs: dict, class_kwargs: dict) -> dict[str, Any]:
    from graphmerge.passes.export import export_onnx_report

    if suite == "hf":
        first = "pixel_values" if inputs[0].is_floating_point() else "input_ids"
        model: nn.Module = _KwargsForward(student, [first, *kwargs], dict(class_kwargs))
        args = (*inputs, *kwargs.values())
    else:
        model, args = student, inputs
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = export_onnx_report(model, args, pathlib.Path(tmp) / "student.onnx")
    except Exception as error:
        return {"onnx_ok": False, "onnx_error": first_line(error), "onnx_s": time.perf_counter() - start}
    return {"onnx_ok": True, "onnx_exporter": report.exporter, "onnx_max_rel": report.max_rel,
            "onnx_s": time.perf_counter() - start}


def graphmerge_row(row: dict[str, Any], suite: str, teachers: list[nn.Module], inputs: tuple, kwargs: dict,
                   build: Callable, onnx: bool) -> dict[str, Any]:
    """Fills ``row`` as it goes (a stage time limit keeps what was measured before it)."""
    import graphmerge

    recertified = None
    try:
        big = graphmerge.widen(teachers, inputs, example_kwargs=kwargs)
    except graphmerge.CertificateError as error:
        # widen refuses the model (I1, or I2 where no group is pinned inside): no merge, so no
        # pipeline run; the unverified big student still gives the I2/I4 columns
        refusal = first_line(error)
        row["pipeline_not_run"] = f"widen refused: {refusal}"
        big = graphmerge.widen(teachers, inputs, example_kwargs=kwargs, verify=False)
        if "(invariant I2)" in str(error):
            row["i2_cert_error"] = refusal
            recertified = _recertify_i1(big, teachers)  # I1 held (widen checks it first); its numbers
        else:
            row["i1_error"] = refusal
    except Exception as error:
        row.update(error_stage(teachers[0], inputs, kwargs, error))
        row["pipeline_not_run"] = f"widen refused ({row.get('error_stage', 'error')}): {row.get('error')}"
        return row
    info = graphmerge.widen_info(big)[1]
    groups = info.groups
    row.update(capture_ok=True, groups=len(groups.groups), widened=len(groups.widened),
               pinned=len(groups.pinned), internal_pinned=len(groups.internal_pinned),
               internal_reasons=[g.reason for g in groups.internal_pinned][:2],
               nodes=getattr(groups, "node_count", None))
    for key in ("trace_s", "couple_s", "widen_s", "certify_s"):
        row[key.replace("trace_s", "capture_s")] = groups.timings.get(key)
    certificate = recertified or info.certificates.get("I1")
    if certificate is not None:
        row.update(i1_rel_error=None if certificate.skipped else certificate.relative_error,
                   i1_dtype=certificate.dtype, i1_skipped=certificate.skipped)
        if certificate.skipped is None and "i1_error" not in row:
            row["i1_ok"] = certificate.relative_error <= I1_EXACT
    if "i1_error" in row:
        row["i1_ok"] = False
    row.setdefault("i1_ok", False)
    certificate = info.certificates.get("I2")  # widen's own I2 (the I2 column is checked below)
    if certificate is not None:
        row.update(i2_cert_max_error=certificate.max_error, i2_cert_skipped=certificate.skipped)
    student = teacher_student_row(row, big, teachers, build)
    if "pipeline_not_run" not in row:
        pipeline_row(row, teachers, inputs, kwargs, big)
    if onnx and student is not None:
        row.update(onnx_row(student, suite, inputs, kwargs, info.class_kwargs or {}))
    return row


def _recertify_i1(big: Any, teachers: list[nn.Module]) -> Any:
    """The I1 certificate of an unverified big student (None if it cannot be computed)."""
    from graphmerge.passes.certify import certify_mean

    import graphmerge

    info = graphmerge.widen_info(big)[1]
    try:
        return certify_mean(big, teachers, info.example_inputs, info.example_kwargs, class_kwargs=info.class_kwargs)
    except Exception:  # widen checked I1 before I2, so this does not happen; the row then shows "-"
        return None


def teacher_student_row(row: dict[str, Any], big: Any, teachers: list[nn.Module],
                        build: Callable) -> nn.Module | None:
    """``compress(big, "teacher:0")`` (timed, I3 included), I2 and I4; the student, or None."""
    import graphmerge

    start = time.perf_counter()
    try:
        student = graphmerge.compress(big, "teacher:0")
    except Exception as error:
        row.update(compress_error=first_line(error), compress_s=time.perf_counter() - start)
        return None
    row["compress_s"] = time.perf_counter() - start
    i3 = graphmerge.student_certificate(student)
    if i3 is not None:
        row.update(i3_rel_error=None if i3.skipped else i3.relative_error, i3_skipped=i3.skipped)
    row.update(check_i2(student, teachers))
    row["student_class"] = type(student).__name__
    try:
        fresh = build(3)
        fresh.load_state_dict(student.state_dict(), strict=True)
        row["i4_ok"] = type(student) is type(teachers[0])
    except Exception as error:
        row.update(i4_ok=False, i4_error=first_line(error))
    row["graphmerge_s"] = sum(row.get(k) or 0.0 for k in ("capture_s", "couple_s", "widen_s", "certify_s",
                                                           "compress_s"))
    return student


PIPELINE_BATCH_SIZES = (3, 1)


def _pipeline_stage(error: BaseException) -> str:
    """The stage ``certify_pipeline`` was in when ``error`` left it: named in its message, or (a
    stage time limit) read from its frame."""
    import re

    found = re.search(r"fails at '([^']*)'", str(error))
    if found:
        return found.group(1)
    tb = error.__traceback__
    stage = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "certify_pipeline":
            stage = getattr(tb.tb_frame.f_locals.get("stage"), "name", None)
        tb = tb.tb_next
    return stage or "?"


def pipeline_row(row: dict[str, Any], teachers: list[nn.Module], inputs: tuple, kwargs: dict, big: Any) -> None:
    """``certify_pipeline`` on the big student widen built: merged end to end, or the stage that
    fails and its error; the I3 certificate of the gates' student, the gates-follow-samples error.
    A stage time limit here is recorded, then raised on (nothing runs after it without a limit)."""
    from graphmerge.pipeline import certify_pipeline

    start = time.perf_counter()
    try:
        report = certify_pipeline(teachers, inputs, example_kwargs=kwargs, big=big,
                                  batch_sizes=PIPELINE_BATCH_SIZES)
    except (Exception, StageTimeout) as error:
        cause = error.__cause__ if isinstance(error.__cause__, Exception) else error
        row.update(pipeline_ok=False, pipeline_s=time.perf_counter() - start, pipeline_stage=_pipeline_stage(error),
                   pipeline_error=first_line(cause))
        if isinstance(error, StageTimeout):
            row["pipeline_stage"] = f"timeout in '{row['pipeline_stage']}'"
            raise
        return
    row.update(pipeline_ok=True, pipeline_s=time.perf_counter() - start,
               pipeline_seconds={k: round(v, 3) for k, v in report.seconds.items()},
               pipeline_sample_error=report.sample_error, pipeline_sample_skipped=report.sample_skipped)
    i3 = report.certificates.get("I3")
    if i3 is not None:
        row.update(pipeline_i3_rel_error=None if i3.skipped else i3.relative_error, pipeline_i3_skipped=i3.skipped)
    else:
        row["pipeline_i3_skipped"] = "no certificate"


def error_stage(model: nn.Module, inputs: tuple, kwargs: dict, error: BaseException) -> dict[str, Any]:
    """Which stage widen failed in: capture (torch.export), analysis (couple) or widen itself."""
    from graphmerge.passes.capture import capture

    import graphmerge

    row: dict[str, Any] = {"error": first_line(error), "traceback": traceback.format_exc(limit=-4)[-1200:]}
    try:
        capture(model, inputs, kwargs)
    except Exception as capture_error:
        row.update(capture_ok=False, error_stage="capture", error=first_line(capture_error))
        return row
    row["capture_ok"] = True
    try:
        groups = graphmerge.analyze(model, inputs, example_kwargs=kwargs)
    except Exception as couple_error:
        row.update(error_stage="analysis", error=first_line(couple_error))
        return row
    row.update(error_stage="widen", groups=len(groups.groups), internal_pinned=len(groups.internal_pinned),
               internal_reasons=[g.reason for g in groups.internal_pinned][:2])
    return row


def _num_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Torch-Pruning's recipe for attention: num_heads for the q/k/v projections of modules that say."""
    heads: dict[nn.Module, int] = {}
    for module in model.modules():
        count = next((getattr(module, a) for a in ("num_heads", "num_attention_heads", "n_heads")
                      if isinstance(getattr(module, a, None), int)), None)
        if not count:
            continue
        for child in ("qkv", "q_proj", "k_proj", "v_proj", "query", "key", "value", "q_lin", "k_lin", "v_lin",
                      "q", "k", "v"):
            layer = getattr(module, child, None)
            if isinstance(layer, nn.Linear):
                heads[layer] = count
    return heads


def _update_heads(model: nn.Module, pruned_heads: dict[nn.Module, int]) -> None:
    """After pruning, the attention modules' head counts and sizes (Torch-Pruning's timm/HF recipe)."""
    for module in model.modules():
        attr = next((a for a in ("num_heads", "num_attention_heads", "n_heads")
                     if isinstance(getattr(module, a, None), int)), None)
        if attr is None:
            continue
        qkv = getattr(module, "qkv", None)
        q = next((getattr(module, c) for c in ("q_proj", "query", "q_lin", "q") if isinstance(getattr(module, c, None),
                                                                                              nn.Linear)), None)
        layer, parts = (qkv, 3) if isinstance(qkv, nn.Linear) else (q, 1)
        if layer is None or layer not in pruned_heads:
            continue
        heads = pruned_heads[layer]
        setattr(module, attr, heads)
        for size in ("head_dim", "attention_head_size"):
            if isinstance(getattr(module, size, None), int):
                setattr(module, size, layer.out_features // (parts * heads))
        if isinstance(getattr(module, "all_head_size", None), int):
            module.all_head_size = layer.out_features // parts


def torch_pruning_row(row: dict[str, Any], teacher: nn.Module, inputs: tuple, kwargs: dict) -> dict[str, Any]:
    """Fills ``row`` as it goes (a stage time limit keeps what was measured before it)."""
    try:
        import torch_pruning as tp
    except ImportError:
        row["tp_error"] = "torch_pruning not installed"
        return row
    if "use_cache" in inspect.signature(teacher.forward).parameters:
        kwargs = {**kwargs, "use_cache": False}  # as graphmerge's capture does: no KV cache in the outputs
    if kwargs:
        first = "pixel_values" if inputs[0].is_floating_point() else "input_ids"
        example: Any = {first: inputs[0], **kwargs}
    else:
        example = inputs[0] if len(inputs) == 1 else inputs

    def forward(model: nn.Module) -> Any:
        return model(**example) if isinstance(example, dict) else model(example)

    model = copy.deepcopy(teacher)
    start = time.perf_counter()
    try:
        tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        row.update(tp_build_ok=True, tp_build_s=time.perf_counter() - start)
    except Exception as error:
        row.update(tp_build_ok=False, tp_build_s=time.perf_counter() - start, tp_error=first_line(error))
        return row
    model = copy.deepcopy(teacher)
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    row["tp_pruned_ok"] = False  # until step() returns (a stage time limit may stop it)
    try:
        head = output_layer(model, inputs, kwargs)
        heads = _num_heads(model)
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=0.5, ignored_layers=[head] if head is not None else [],
                                           num_heads=heads)
        pruner.step()
        _update_heads(model, pruner.num_heads)
        row.update(tp_pruned_ok=True, tp_prune_s=time.perf_counter() - start, tp_num_heads=len(heads),
                   tp_params_kept=sum(p.numel() for p in model.parameters()) / before)
    except Exception as error:
        row.update(tp_pruned_ok=False, tp_prune_s=time.perf_counter() - start, tp_error=first_line(error))
        return row
    try:
        with torch.no_grad():
            forward(model)
        row["tp_ran_ok"] = True
    except Exception as error:
        row.update(tp_ran_ok=False, tp_error=first_line(error))
    return row


def run_model(suite: str, name: str, onnx: bool = True, timeout: float | None = None,
              partial: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Everything about one model, in this process; never raises. With ``timeout``, graphmerge's
    stages get 2/3 of it and Torch-Pruning 1/3; ``partial`` gets the row after graphmerge."""
    warnings.simplefilter("ignore")
    row: dict[str, Any] = {"suite": suite, "model": name}
    start = time.perf_counter()
    try:
        params = meta_params(suite, name)
        if params is not None and params > PARAM_CAP:
            row.update(params=params, skipped=f"{params / 1e6:.0f} M parameters > {PARAM_CAP / 1e6:.0f} M cap")
            return row
        build, inputs, kwargs = model_spec(suite, name)
        teachers = [build(seed) for seed in range(1, N_TEACHERS + 1)]
        row.update(params=sum(p.numel() for p in teachers[0].parameters()), input=[list(x.shape) for x in inputs],
                   kwargs=sorted(kwargs), build_s=time.perf_counter() - start)
    except Exception as error:
        row.update(error=first_line(error), error_stage="build")
        return row
    gm_limit, tp_limit = (None, None) if not timeout else (timeout * 2 / 3, timeout / 3)
    try:
        with time_limit(gm_limit):
            graphmerge_row(row, suite, teachers, inputs, kwargs, build, onnx)
    except (Exception, StageTimeout) as error:  # a benchmark reports failures, it does not stop on them
        stage = "timeout" if isinstance(error, StageTimeout) else row.get("error_stage", "benchmark")
        row.update(error=first_line(error), error_stage=stage, traceback=traceback.format_exc(limit=-4)[-1200:])
    if partial is not None:
        partial(dict(row))
    try:
        with time_limit(tp_limit):
            torch_pruning_row(row, teachers[0], inputs, kwargs)
    except (Exception, StageTimeout) as error:
        row.update(tp_error=first_line(error))
    row["total_s"] = time.perf_counter() - start
    return row


class StageTimeout(BaseException):
    """Raised by the alarm of ``time_limit`` (a BaseException: library code's ``except Exception``
    does not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt the Python code of this block after ``seconds`` (SIGALRM; main thread only)."""
    if not seconds:
        yield
        return

    def alarm(*_: Any) -> None:
        raise StageTimeout(f"stage time limit of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _worker(conn: Any, suite: str, name: str, onnx: bool, timeout: float) -> None:
    torch.set_num_threads(1)
    try:
        conn.send(("final", run_model(suite, name, onnx, timeout, partial=lambda r: conn.send(("partial", r)))))
    finally:
        conn.close()


def run_isolated(suite: str, name: str, onnx: bool, timeout: float) -> dict[str, Any]:
    """run_model in a forked child with a timeout; a hang or a crash becomes the row's error.

    Inside, graphmerge gets 2/3 of the time and Torch-Pruning 1/3 (alarms); the child sends its row
    after graphmerge too, so a hang that no alarm interrupts (C code) keeps graphmerge's results."""
    if timeout <= 0:
        return run_model(suite, name, onnx)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_worker, args=(send, suite, name, onnx, timeout * 0.95), daemon=True)
    start = time.perf_counter()
    process.start()
    send.close()
    row, final = None, False
    try:
        while not final and receive.poll(max(0.0, timeout - (time.perf_counter() - start))):
            kind, row = receive.recv()
            final = kind == "final"
    except EOFError:  # the child died before sending
        pass
    process.join(5 if final else 0.1)
    if process.is_alive():
        process.kill()
        process.join()
    if row is not None and not final:
        row["tp_error"] = (f"the worker stopped after graphmerge, in Torch-Pruning (whole-model limit "
                           f"{timeout:.0f} s; exit code {process.exitcode})")
    if row is None:
        elapsed = time.perf_counter() - start
        what = (f"timeout after {timeout:.0f} s" if elapsed >= timeout
                else f"worker died (exit code {process.exitcode})")
        row = {"suite": suite, "model": name, "error": what, "error_stage": "timeout" if "timeout" in what
               else "crash", "total_s": elapsed}
    return row


# -- reporting ----------------------------------------------------------------------------------

def _count(rows: list[dict], key: str) -> int:
    return sum(1 for r in rows if r.get(key) is True)


def suite_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [r for r in rows if "skipped" not in r]
    onnx = [r for r in ran if "onnx_ok" in r]
    return {
        "models": len(ran), "skipped": len(rows) - len(ran),
        "captured": _count(ran, "capture_ok"),
        "no_internal_pins": sum(1 for r in ran if r.get("capture_ok") and r.get("internal_pinned") == 0),
        "i1_exact": _count(ran, "i1_ok"), "i2": _count(ran, "i2_ok"), "i4": _count(ran, "i4_ok"),
        "onnx_attempted": len(onnx), "onnx_parity": _count(onnx, "onnx_ok"),
        "tp_built": _count(ran, "tp_build_ok"), "tp_pruned": _count(ran, "tp_pruned_ok"),
        "tp_ran": _count(ran, "tp_ran_ok"),
        "merged": _count(ran, "pipeline_ok"), "pipeline_failed": sum(1 for r in ran if r.get("pipeline_ok") is False),
        "pipeline_refused": sum(1 for r in ran if "pipeline_not_run" in r),
        "pipeline_not_run": sum(1 for r in ran if "pipeline_ok" not in r and "pipeline_not_run" not in r),
    }


def summary_line(suite: str, s: dict[str, Any]) -> str:
    n = s["models"]
    onnx = f"{s['onnx_parity']}/{s['onnx_attempted']}" if s["onnx_attempted"] else "not run"
    skipped = f" ({s['skipped']} skipped)" if s["skipped"] else ""
    merged = f"merged end to end {s.get('merged', 0)}/{n}"
    if s.get("pipeline_not_run"):  # rows from before the pipeline column
        merged += f" ({s['pipeline_not_run']} not run)"
    return (f"{suite}: {n} models{skipped}; "
            f"captured {s['captured']}/{n}, no internal pins {s['no_internal_pins']}/{n}, "
            f"I1 exact (<= {I1_EXACT:g}) {s['i1_exact']}/{n}, I2 {s['i2']}/{n}, I4 {s['i4']}/{n}, "
            f"{merged}, ONNX parity {onnx}; Torch-Pruning built {s['tp_built']}/{n}, pruned {s['tp_pruned']}/{n}, "
            f"ran {s['tp_ran']}/{n}")


def _yes(row: dict, key: str) -> str:
    value = row.get(key)
    return "-" if value is None else "yes" if value else "**no**"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def merged_cells(r: dict[str, Any]) -> list[str]:
    """merged end to end (yes / **no**: the failing stage / not run: why), the gates' student's I3,
    the gates-follow-samples error, the pipeline's seconds."""
    if "pipeline_ok" not in r:
        why = "not run (widen refused)" if "pipeline_not_run" in r else "not run"
        return [why, "-", "-", "-"]
    if r["pipeline_ok"]:
        i3 = ("skipped" if r.get("pipeline_i3_skipped") else _fmt(r.get("pipeline_i3_rel_error"), ".1e"))
        samples = ("skipped" if r.get("pipeline_sample_skipped") else _fmt(r.get("pipeline_sample_error"), ".1e"))
        return ["yes", i3, samples, _fmt(r.get("pipeline_s"), ".1f")]
    stage = str(r.get("pipeline_stage", "?")).replace("|", "\\|")
    return [f"**no**: {stage}", "-", "-", _fmt(r.get("pipeline_s"), ".1f")]


def table_row(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return (f"| {r['model']} | {_fmt(r.get('params', 0) / 1e6, '.1f')} | skipped: {r['skipped']} |"
                + " |" * (HEADER.count("|") - 4))
    capture = ("yes" if r.get("capture_ok") else "**no**" if r.get("capture_ok") is False
               else f"**{r.get('error_stage', 'error')}**")
    i1 = ("pinned" if r.get("i1_skipped") else
          f"{_fmt(r.get('i1_rel_error'), '.1e')} {r.get('i1_dtype', '')}".strip() if "i1_dtype" in r else "-")
    if r.get("i1_error"):
        i1 = "**fails**"
    elif r.get("i1_ok") is False and not r.get("i1_skipped"):
        i1 = f"**{i1}**"
    onnx = ("-" if "onnx_ok" not in r else f"{r['onnx_max_rel']:.0e}" if r["onnx_ok"] else "**fail**")
    tp = "/".join({True: "y", False: "n", None: "-"}[r.get(k)] for k in ("tp_build_ok", "tp_pruned_ok", "tp_ran_ok"))
    if r.get("tp_params_kept") is not None:
        tp += f" ({r['tp_params_kept']:.0%})"
    cells = [r["model"], _fmt((r.get("params") or 0) / 1e6, ".2f"), capture, _fmt(r.get("groups"), "d"),
             _fmt(r.get("internal_pinned"), "d"), i1, _yes(r, "i2_ok"), _yes(r, "i4_ok"), *merged_cells(r), onnx,
             _fmt(r.get("capture_s"), ".2f"), _fmt(r.get("couple_s"), ".2f"), _fmt(r.get("widen_s"), ".2f"),
             _fmt(r.get("certify_s"), ".2f"), _fmt(r.get("compress_s"), ".2f"), _fmt(r.get("onnx_s"), ".1f"),
             tp, _fmt(r.get("tp_build_s"), ".2f")]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| model | M params | capture | groups | int. pins | I1 rel err | I2 | I4 | merged end to end "
          "| merged: I3 rel err | merged: samples err | merged s | ONNX rel err | capture s "
          "| couple s | widen s | certify s | compress s | ONNX s | TP build/prune/fwd | TP build s |")


def failure_lines(r: dict[str, Any]) -> list[str]:
    out = []
    if r.get("error"):
        out.append(f"{r.get('error_stage', 'error')}: {r['error']}")
    if r.get("internal_reasons"):
        out += [f"pinned inside: {reason}" for reason in r["internal_reasons"]]
    for key in ("i1_error", "compress_error", "i4_error", "onnx_error"):
        if r.get(key):
            out.append(f"{key.split('_')[0]}: {r[key]}")
    if r.get("i2_cert_error"):
        out.append(f"widen's I2: {r['i2_cert_error']}")
    if r.get("i2_ok") is False:
        out.append(f"I2: {r.get('i2_bad_count')} tensor(s) differ, e.g. {', '.join(r.get('i2_bad', []))}")
    if r.get("pipeline_ok") is False:
        out.append(f"merged end to end fails at '{r.get('pipeline_stage')}': {r.get('pipeline_error')}")
    elif r.get("pipeline_not_run") and not r.get("error"):  # a capture/analysis error is listed already
        out.append(f"merged end to end not run: {r['pipeline_not_run']}")
    if r.get("tp_error"):
        stage = ("build" if r.get("tp_build_ok") is False else "prune" if r.get("tp_pruned_ok") is False
                 else "forward")
        out.append(f"Torch-Pruning {stage}: {r['tp_error']}")
    return out


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = ["# graphmerge coverage benchmark", "",
             f"Machine: {machine['platform']}, {machine['cpu']} ({machine['cpu_count']} cores, shared with "
             f"other jobs: times are noisy), torch {machine['torch']}, timm {machine['timm']}, transformers "
             f"{machine['transformers']}, Torch-Pruning {machine['torch_pruning']}; one torch thread.", "",
             "Two teachers per model (random weights, every floating tensor perturbed). I1: the big student's "
             f"certificate (relative error; exact means <= {I1_EXACT:g}, 'pinned' means groups pinned inside "
             "the network, so I1 cannot hold). I2: `compress(big, 'teacher:0')` tensors bitwise teacher 0's, "
             "its / 2 or the mean. I4: the teachers' class, strict reload. Merged end to end: "
             "`graphmerge.pipeline.certify_pipeline` on the same big student (add_gates, one train-mode gate step "
             f"at {PIPELINE_BATCH_SIZES[0]} samples, gates follow samples, decide, compress by the gates with I3, "
             f"strict reload and a forward at {PIPELINE_BATCH_SIZES[1]} sample): yes, or the stage that fails; "
             "'merged: I3 rel err' is the gates' student's certificate, 'merged: samples err' the gated big "
             "student on the batch against each sample alone; 'not run (widen refused)': widen raised, so there "
             "is no merge; 'not run': a row from before this column. ONNX: the student exported, "
             "onnxruntime parity (max relative error). TP: Torch-Pruning `build_dependency` / "
             "MagnitudePruner 50% `step()` / forward after pruning (in brackets: the share of parameters "
             "left; 100% means it found nothing to prune). Torch-Pruning gets `num_heads` for attention "
             "modules that expose a head count and their head attributes are updated after pruning (its "
             "timm/HF recipe), but not its examples' hand-patched forwards (e.g. timm ViT's "
             "`reshape(B, N, C)`), so such forwards fail after pruning.", "", "## Summary", ""]
    by_suite: dict[str, list[dict]] = {}
    for row in report["models"]:
        by_suite.setdefault(row["suite"], []).append(row)
    for suite in SUITES:
        if suite in by_suite:
            lines.append(f"- {summary_line(suite, report['summary'][suite])}")
    lines += ["", "Runs that produced these rows:", ""]
    for run in report.get("runs", []):
        not_run = f"; not reached (time budget): {len(run['not_run'])}" if run.get("not_run") else ""
        lines.append(f"- {run['date']}: `{run['command']}` ({run['models']} models; graphmerge at "
                     f"{run.get('source', 'unknown')}{not_run})")
    for suite in SUITES:
        rows = by_suite.get(suite)
        if not rows:
            continue
        lines += ["", f"## {suite}", "", summary_line(suite, report["summary"][suite]), "", HEADER,
                  "|" + "---|" * (HEADER.count("|") - 1)]
        lines += [table_row(r) for r in rows]
        failures = [(r["model"], failure_lines(r)) for r in rows]
        failures = [(m, f) for m, f in failures if f]
        if failures:
            lines += ["", f"### {suite}: failures and pins", ""]
            for model, what in failures:
                lines.append(f"- **{model}**: " + "; ".join(w.replace("|", "\\|")[:300] for w in what))
    return "\n".join(lines) + "\n"


def snapshot_graphmerge() -> list[str]:
    """Import every graphmerge module now, before forking: the workers then all run the code as it
    was when the sweep started, even while the working tree is being edited."""
    import importlib
    import pkgutil

    import graphmerge.passes

    import graphmerge

    names = []
    for package in (graphmerge, graphmerge.passes):
        for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            try:
                importlib.import_module(module.name)
                names.append(module.name)
            except ImportError:  # an optional dependency (e.g. of the CLI) missing
                pass
    return names


def source_revision() -> str:
    """The git commit of the checkout, and whether graphmerge's sources differ from it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "graphmerge", "passes")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}{' + uncommitted changes to graphmerge/passes' if dirty else ''}"


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def version(module: str) -> str | None:
        try:
            return getattr(__import__(module), "__version__", "installed")
        except ImportError:
            return None

    return {"platform": platform.platform(), "cpu": cpu or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": version("torchvision"),
            "timm": version("timm"), "transformers": version("transformers"),
            "torch_pruning": version("torch_pruning"), "onnxruntime": version("onnxruntime"), "threads": 1}


def load(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write(report: dict[str, Any], json_path: pathlib.Path, md_path: pathlib.Path) -> None:
    order = {s: i for i, s in enumerate(SUITES)}
    report["models"].sort(key=lambda r: (order.get(r["suite"], 9), r["model"].lower()))
    by_suite: dict[str, list[dict]] = {}
    for row in report["models"]:
        by_suite.setdefault(row["suite"], []).append(row)
    report["summary"] = {suite: suite_summary(rows) for suite, rows in by_suite.items()}
    for path, text in ((json_path, json.dumps(report, indent=1, default=str)), (md_path, markdown(report))):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def is_done(row: dict[str, Any]) -> bool:
    """The row has every column of this script: the merged-end-to-end one (run or refused), or the
    model was skipped (parameter cap)."""
    return "skipped" in row or "pipeline_ok" in row or "pipeline_not_run" in row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, action="append",
                        help="model set (repeatable; default: all three)")
    parser.add_argument("--models", help="comma-separated names within --suite (any timm/torchvision name)")
    parser.add_argument("--quick", action="store_true", help="3 small models per suite, no ONNX")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export of the student")
    parser.add_argument("--timeout-per-model", type=float, default=600.0,
                        help="seconds per model in a forked worker (0: in this process, no timeout)")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="start no new model after this many seconds (0: no limit)")
    parser.add_argument("--skip-done", action="store_true",
                        help="skip models already in the JSON with the current columns (rows from before the "
                             "merged-end-to-end column are run again)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="results JSON (merged into by suite/model)")
    parser.add_argument("--markdown", default=None, help="markdown path (default: the JSON path with .md)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    suites = args.suite or list(SUITES)
    if args.models and len(suites) != 1:
        raise SystemExit("--models needs exactly one --suite")
    work = []
    for suite in suites:
        names = (args.models.split(",") if args.models else QUICK[suite] if args.quick else suite_models(suite))
        work += [(suite, name) for name in names]
    for module in ("torchvision", "timm", "transformers", "torch_pruning", "onnxruntime"):  # before forking
        try:
            __import__(module)
        except ImportError:
            pass
    snapshot_graphmerge()
    json_path = pathlib.Path(args.json)
    md_path = pathlib.Path(args.markdown) if args.markdown else json_path.with_suffix(".md")
    report = load(json_path)
    report["machine"] = machine_info()
    rows = {(r["suite"], r["model"]): r for r in report.get("models", [])}
    report["models"] = list(rows.values())
    onnx = not (args.quick or args.no_onnx)
    command = "python benchmarks/coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command, "models": 0,
           "source": source_revision(), "not_run": []}
    report["runs"] = [*report.get("runs", []), run]
    start = time.perf_counter()
    for suite, name in work:
        if args.skip_done and (suite, name) in rows and is_done(rows[(suite, name)]):
            continue
        if args.time_budget and time.perf_counter() - start > args.time_budget:
            run["not_run"].append(f"{suite}/{name}")
            continue
        row = run_isolated(suite, name, onnx, args.timeout_per_model)
        rows[(suite, name)] = row
        report["models"] = list(rows.values())
        run["models"] += 1
        done = [f"capture={'ok' if row.get('capture_ok') else row.get('error_stage', '?')}"]
        if "pipeline_ok" in row or "pipeline_not_run" in row:
            done.append("merged=" + ("refused by widen" if "pipeline_ok" not in row else "yes" if row["pipeline_ok"]
                                     else f"no ({row.get('pipeline_stage')})"))
        for key in ("groups", "internal_pinned", "i1_rel_error", "i2_ok", "i4_ok", "onnx_ok",
                    "tp_build_ok", "tp_pruned_ok", "tp_ran_ok", "total_s"):
            if key in row:
                value = row[key]
                done.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
        print(f"[{time.perf_counter() - start:6.0f}s] {suite}/{name}: {', '.join(done)}"
              + (f"  ({row['error']})" if row.get("error") else ""), flush=True)
        write(report, json_path, md_path)
    write(report, json_path, md_path)
    print()
    for suite in SUITES:
        if suite in report["summary"]:
            print(summary_line(suite, report["summary"][suite]))
    if run["not_run"]:
        print(f"not run (time budget): {len(run['not_run'])} models")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sharded training (strategy="fsdp", FSDP2) on CPU (gloo, 2 processes under torchrun).

What must hold, and why:

- **Sharded = unsharded with the same processes, bitwise.** A sharded run and a DDP run of two
  processes draw the same random numbers (the gate noise is seeded per rank the same way), see the
  same per-rank batches and run the same ops on the same full weights (FSDP gathers them before a
  unit runs). They differ only in how a gradient is averaged: DDP all-reduces ``g/2``, FSDP
  reduce-scatters ``g`` and divides, the replicated gates are all-reduced and divided. With two
  ranks every average is ``a/2 + b/2`` or ``(a + b)/2``, and since halving is exact in binary
  floating point and addition is commutative, both give the same bits. So the whole merge, gate
  phase included, must give the same student to the bit.
- **Sharded = one process, up to float summation order.** Against a single process the gate phase
  cannot be compared (each rank draws its own gate noise for its samples, see tests/test_ddp.py),
  so this comparison runs without gate epochs: compression of the initial gates, then fine-tuning
  of the sharded student. A rank's loss is the mean over its half of the batch and the gradients
  are averaged, where one process takes the mean over the whole batch: the same number up to the
  order of float32 summation, i.e. about one rounding (eps = 2^-23 relative) per optimiser step.
  Over S steps of a short, small-lr run these add up rather than grow, so the tolerance is
  ``S · eps · max|w|``, computed below from the run (8 steps; max|w| about 3.4: about 3e-6; the
  observed difference is about 1e-8).
- **Resume.** A sharded run killed after a gate epoch, resumed, killed after a fine-tuning epoch and
  resumed again ends with the uninterrupted run's student, bitwise (every rank's shards and RNG
  states are in the checkpoint).
- **Memory.** Each rank holds a ``ceil(rows / 2)`` slice along dim 0 of every sharded parameter
  (torch.chunk's split, FSDP2's default) plus the whole gates; computed here from the unsharded
  model's shapes and compared with what the run reports.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import graphmerge
from graphmerge.checkpoint import load_state, save_weights
from graphmerge.errors import GraphMergeError

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fsdp")]

COMMON = """
    import json, os, signal, sys
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from graphmerge.checkpoint import save_weights
    from graphmerge.examples.tiny_gpt import build_model
    from graphmerge.recipe import merge

    VOCAB, T = 32, 8
    rank = os.environ.get("RANK", "0")
    tokens = torch.randint(0, VOCAB, (80, T + 1), generator=torch.Generator().manual_seed(0))
    train_data = TensorDataset(tokens[:64, :-1], tokens[:64, 1:])
    # 5 samples in batches of 2: rank 0 evaluates 3 (2 batches), rank 1 2 (1 batch)
    val_data = DataLoader(TensorDataset(tokens[64:69, :-1], tokens[64:69, 1:]), batch_size=2)

    def teachers():
        models = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            models.append(build_model(vocab_size=VOCAB, d_model=16, n_heads=2, n_layers=2, context=T))
        return models

    def run(out, strategy, gate_epochs, **options):
        result = merge(teachers(), train_data, val_data=val_data, loss="cross_entropy", gate_epochs=gate_epochs,
                       finetune_epochs=2, batch_size=16, strategy=strategy, preflight=False, **options)
        os.makedirs(out, exist_ok=True)
        save_weights(f"{out}/student_rank{rank}.safetensors", result.student)
        with open(f"{out}/summary_rank{rank}.json", "w") as handle:
            json.dump({"summary": result.summary, "open": result.open_fraction}, handle)
"""

REFERENCE_SCRIPT = COMMON + """
    out = sys.argv[1]
    if os.environ.get("WORLD_SIZE"):
        run(f"{out}/fsdp", "fsdp", 2, checkpoint_dir=f"{out}/fsdp_ck")
        run(f"{out}/ddp", "ddp", 2)
        run(f"{out}/fsdp_no_gates", "fsdp", 0)
    else:
        run(f"{out}/single_no_gates", "ddp", 0)
"""

RESUME_SCRIPT = COMMON + """
    out, crash_at, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"

    def crash_after_checkpoint(record):  # the log runs (on rank 0) after the epoch's checkpoint is written
        if f"{record['phase']}:{record['epoch']}" == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run(out, "fsdp", 2, checkpoint_dir=f"{out}/ck", resume=resume, log=crash_after_checkpoint)
"""


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    return environment


def _launch(script: Path, *args: str, processes: int = 2) -> subprocess.Popen:
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                         f"--nproc_per_node={processes}", "--standalone"]
    return subprocess.Popen([*launcher, str(script), *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def _script(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sharded (2 processes), DDP (2 processes) and single-process merges, side by side."""
    folder = tmp_path_factory.mktemp("fsdp")
    script = _script(folder, "reference.py", REFERENCE_SCRIPT)
    launched = [_launch(script, str(folder)), _launch(script, str(folder), processes=1)]
    for process in launched:
        code, output = _finish(process)
        assert code == 0, output
    return folder


def _student(folder: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(folder / f"student_rank{rank}.safetensors")


def _summary(folder: Path, rank: int = 0) -> dict:
    return json.loads((folder / f"summary_rank{rank}.json").read_text())


def test_sharded_run_equals_the_ddp_run_bitwise_and_ranks_agree(runs: Path):
    sharded, ddp = _student(runs / "fsdp"), _student(runs / "ddp")
    assert sharded.keys() == ddp.keys()
    assert all(torch.equal(sharded[k], ddp[k]) for k in sharded), "sharded and DDP students differ"
    other_rank = _student(runs / "fsdp", rank=1)
    assert all(torch.equal(sharded[k], other_rank[k]) for k in sharded), "the ranks' students differ"
    # the gates were replicated: every rank saw the same open fractions (hence made the same decision)
    assert _summary(runs / "fsdp")["open"] == _summary(runs / "fsdp", rank=1)["open"]
    # the validation metrics count each sample once although rank 0 ran one more batch than rank 1
    metrics = ("teachers", "big", "before_finetune", "after_finetune")
    assert {k: _summary(runs / "fsdp")["summary"][k] for k in metrics} == \
           {k: _summary(runs / "ddp")["summary"][k] for k in metrics}


def test_sharded_run_equals_the_single_process_run_up_to_summation_order(runs: Path):
    sharded, single = _student(runs / "fsdp_no_gates"), _student(runs / "single_no_gates")
    assert sharded.keys() == single.keys()
    steps = 2 * (64 // 16)  # fine-tuning epochs x steps per epoch
    scale = max(float(t.abs().max()) for t in single.values())
    tolerance = steps * torch.finfo(torch.float32).eps * scale
    difference = max(float((sharded[k] - single[k]).abs().max()) for k in sharded)
    assert difference <= tolerance, f"sharded vs single process: {difference:.3g} > {tolerance:.3g}"


def _expected_bytes_per_rank(model: torch.nn.Module, replicated: set[int], ranks: int) -> list[int]:
    """Each rank's bytes under dim-0 sharding by torch.chunk (chunks of ceil(rows / ranks))."""
    per_rank = [0] * ranks
    for param in model.parameters():
        if id(param) in replicated:
            per_rank = [b + param.numel() * param.element_size() for b in per_rank]
            continue
        rows, row_bytes = param.shape[0], param[0].numel() * param.element_size()
        chunk = math.ceil(rows / ranks)
        per_rank = [b + max(0, min(rows, (r + 1) * chunk) - r * chunk) * row_bytes for r, b in enumerate(per_rank)]
    return per_rank


def test_each_rank_holds_half_the_parameters(runs: Path):
    from graphmerge.examples.tiny_gpt import build_model

    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(build_model(vocab_size=32, d_model=16, n_heads=2, n_layers=2, context=8).eval())
    big = graphmerge.widen(teachers, (torch.zeros(2, 8, dtype=torch.long),))
    gated = graphmerge.add_gates(big)
    gates = {id(p) for p in gated.gate_parameters()}
    reported = _summary(runs / "fsdp")["summary"]["sharding"]
    for phase, model, replicated in (("gate", gated, gates), ("finetune", teachers[0], set())):
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        expected = _expected_bytes_per_rank(model, replicated, 2)
        assert reported[phase]["param_bytes_unsharded"] == full
        assert reported[phase]["param_bytes_per_rank"] == expected, phase
        # 5 units: embedding, 2 blocks, final norm, head
        assert reported[phase]["units"] == 5
    gate_share = sum(p.numel() * p.element_size() for p in gated.gate_parameters()) / reported["gate"][
        "param_bytes_unsharded"]
    assert reported["gate"]["ratio"] == pytest.approx(0.5 + gate_share / 2, abs=0.01)  # the gates stay whole
    assert reported["finetune"]["ratio"] == pytest.approx(0.5, abs=0.01)


def test_resume_from_sharded_checkpoints_gives_the_uninterrupted_result(runs: Path, tmp_path: Path):
    script = _script(tmp_path, "resume.py", RESUME_SCRIPT)
    out = tmp_path / "run"
    for crash_at, resume in (("gate:1", "0"), ("finetune:1", "1")):
        code, output = _finish(_launch(script, str(out), crash_at, resume))
        assert code != 0, output  # killed (torchrun reports the lost worker)
        saved = load_state(out / "ck" / "merge.safetensors")
        phase, epoch = crash_at.split(":")
        assert (saved["phase"], saved["epoch"]) == (phase, int(epoch))
        assert "model" not in saved and saved["sharded"]["folder"] == f"sharded/{phase}-{epoch}"
        assert sorted(p.name for p in (out / "ck" / "sharded").iterdir()) == [f"{phase}-{epoch}"]
        assert not (out / "student_rank0.safetensors").exists()
    code, output = _finish(_launch(script, str(out), "never", "1"))
    assert code == 0, output
    expected, actual = _student(runs / "fsdp"), _student(out)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "resumed student differs"


def test_sharding_without_torchrun_is_refused_before_anything_is_written(run_cli, tmp_path: Path, monkeypatch):
    from graphmerge.examples.mlp import build_model

    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for index in range(2):
        save_weights(tmp_path / f"t{index}.safetensors", build_model(hidden=4))
    done = run_cli("merge", "examples:mlp", "--teacher", "t0.safetensors", "--teacher", "t1.safetensors",
                   "--data", "sine", "--out", "student.safetensors", "--checkpoint-dir", "ck", "--shard",
                   env={"WORLD_SIZE": ""})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "torchrun" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "student.safetensors").exists() and not (tmp_path / "ck").exists()
    with pytest.raises(GraphMergeError, match="torchrun"):
        graphmerge.merge([build_model(hidden=4), build_model(hidden=4)], [(torch.zeros(1), torch.zeros(1))],
                         loss="mse", strategy="fsdp", checkpoint_dir=tmp_path / "api_ck")
    assert not (tmp_path / "api_ck").exists()


def test_a_tied_weight_stays_in_the_root_unit_and_the_outlined_graph_computes_the_same():
    """Outlining (a captured graph's units moved into their modules' forward) changes no number, in
    training mode with gradients; a weight shared by the embedding and the head keeps both out of
    the units."""
    from graphmerge import sharding
    from graphmerge.examples.tiny_gpt import build_model

    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_model(vocab_size=32, d_model=16, n_heads=2, n_layers=2, context=8)
        model.lm_head.weight = model.tok_emb.weight
        teachers.append(model.eval())
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
    gated = graphmerge.add_gates(graphmerge.widen(teachers, (ids,)), seed=0)
    copy = sharding._training_copy(gated)
    units = sharding.shard_units(copy, [p for p in copy.parameters() if id(p) in {id(q) for q in
                                                                                   gated.gate_parameters()}])
    assert units == ["graph_module.tok_emb", "graph_module.blocks.0", "graph_module.blocks.1",
                     "graph_module.norm", "graph_module.lm_head"]
    tied = sharding._shared_units(copy, units)
    assert tied == {"graph_module.tok_emb", "graph_module.lm_head"}
    blocks = [u for u in units if u not in tied]
    outlined = sharding._outline(copy.graph_module, [u.removeprefix("graph_module.") for u in blocks])
    assert outlined == ["blocks.0", "blocks.1", "norm"]
    assert [n.target for n in copy.graph_module.graph.nodes if n.op == "call_module" and n.target in outlined] \
        == outlined
    results = []
    for model in (gated, copy):
        torch.manual_seed(3)
        output = model.train()(ids)
        output.square().mean().backward()
        results.append((output.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        for param in model.parameters():
            param.grad = None
    (expected, expected_grads), (actual, actual_grads) = results
    assert torch.equal(expected, actual)
    assert expected_grads.keys() == actual_grads.keys()
    assert all(torch.equal(expected_grads[k], actual_grads[k]) for k in expected_grads)


def test_unknown_strategy_is_refused():
    with pytest.raises(GraphMergeError, match="unknown strategy 'zero3'"):
        graphmerge.merge([torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)], [(torch.zeros(1), torch.zeros(1))],
                         loss="mse", strategy="zero3")


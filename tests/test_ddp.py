"""DistributedDataParallel on CPU (gloo): a 2-process torchrun run equals the single-process run.

What "equal" can mean: the global batch is the same (each rank takes half of every batch the single
process sees, from the same seeded permutation) and DDP averages the two half-batch gradients, i.e.
the full-batch gradient. So everything without per-sample randomness agrees with the single
process up to float summation order: teacher training, compression and fine-tuning (the sine MLP
has no BatchNorm, whose batch statistics would be per rank). The gate phase draws hard-concrete
noise per sample and each rank draws its own (seed + rank offset), so a DDP gate phase is a
different (equally valid) random run: for it we check what DDP must guarantee, that both replicas
end bitwise identical (gates and weights updated identically).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
    import os, sys
    from graphmerge.checkpoint import save_weights
    from graphmerge.data import sine
    from graphmerge.examples.mlp import build_model
    from graphmerge.recipe import merge

    out = sys.argv[1]
    rank = os.environ.get("RANK", "0")
    train_data, val_data, _, _ = sine(n_train=512, n_val=64, n_test=1)
    records = []
    no_noise = merge(build_model, train_data, val_data=val_data, loss="mse", teacher_epochs=2, gate_epochs=0,
                     finetune_epochs=2, batch_size=32, checkpoint_dir=f"{out}/ck", log=records.append)
    for i, teacher in enumerate(no_noise.teachers):
        save_weights(f"{out}/teacher{i}_rank{rank}.safetensors", teacher)
    save_weights(f"{out}/student_rank{rank}.safetensors", no_noise.student)
    gated = merge(no_noise.teachers, train_data, loss="mse", gate_epochs=2, finetune_epochs=1, batch_size=32,
                  lambda0=0.5)
    save_weights(f"{out}/gated_student_rank{rank}.safetensors", gated.student)
    if rank == "0":
        assert len(records) == 6, records  # only the main rank logs
"""


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


@pytest.mark.slow
def test_torchrun_two_processes_equals_single_process(tmp_path: Path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    done = subprocess.run([sys.executable, str(script), str(single)], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(script), str(ddp)], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("teacher0", "teacher1", "student", "gated_student"):
        rank0 = load_file(ddp / f"{name}_rank0.safetensors")
        rank1 = load_file(ddp / f"{name}_rank1.safetensors")
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), f"{name}: replicas differ"
    for name in ("teacher0", "teacher1", "student"):
        reference = load_file(single / f"{name}_rank0.safetensors")
        ddp_result = load_file(ddp / f"{name}_rank0.safetensors")
        assert _close(ddp_result, reference, atol=1e-4), f"{name}: DDP result differs from single process"
    assert (ddp / "ck" / "merge.safetensors").is_file()

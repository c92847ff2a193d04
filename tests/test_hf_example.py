"""examples/hf_trainer_merge.py at tiny sizes: two GPT-2 teachers trained by transformers.Trainer, the gate
phase in Trainer through GatePhaseCallback, compress, fine-tune in Trainer, save_pretrained.

The script runs in a fresh process, as a user runs it. What it reports is checked against values computed
here from what it wrote: the perplexities from the saved models' own next-token loss on the last 10% of
the corpus' blocks, the student's architecture against the teachers'.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "hf_trainer_merge.py"
TINY = ["--hidden", "16", "--layers", "1", "--heads", "2", "--block-size", "32", "--text-chars", "8000",
        "--teacher-steps", "20", "--gate-steps", "10", "--finetune-steps", "10", "--batch-size", "16"]


def validation_blocks(out: Path, tokenizer, block: int) -> torch.Tensor:
    """The corpus as graphmerge.text_dataset cuts it (tokens + end-of-text, whole blocks), last 10% of blocks."""
    ids = tokenizer(out.joinpath("corpus.txt").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    ids = ids + [tokenizer.eos_token_id]
    blocks = torch.tensor(ids[:len(ids) // block * block]).reshape(-1, block)
    return blocks[-max(1, len(blocks) // 10):]


@pytest.mark.slow
def test_the_trainer_example_merges_two_gpt2_teachers(tmp_path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *TINY], capture_output=True, text=True,
                            timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation perplexity" in result.stdout and "student after fine-tuning" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["gate_phase_done"] is True

    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "student", local_files_only=True)
    val = validation_blocks(out, tokenizer, report["block_size"])
    assert len(val) == report["val_blocks"]
    student = transformers.AutoModelForCausalLM.from_pretrained(out / "student", local_files_only=True).eval()
    teacher = transformers.GPT2LMHeadModel.from_pretrained(out / "teacher0", local_files_only=True).eval()
    assert type(student) is transformers.GPT2LMHeadModel
    assert {k: v.shape for k, v in student.state_dict().items()} == {k: v.shape for k, v in
                                                                     teacher.state_dict().items()}
    transformers.GPT2LMHeadModel(student.config).load_state_dict(student.state_dict(), strict=True)
    with torch.no_grad():
        for model, reported in ((teacher, report["teachers"][0]), (student, report["student_after_finetune"])):
            assert reported == pytest.approx(math.exp(float(model(input_ids=val, labels=val).loss)), rel=1e-4)
        prompt = val[:1, :5]
        generated = student.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                     min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, 9) and torch.equal(generated[:, :5], prompt)
    assert all(math.isfinite(v) for v in (report["big_student"], report["student_before_finetune"]))

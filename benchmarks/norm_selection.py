"""How a channel group that a normalisation spans is selected: one teacher's whole block, or a mix.

In a pre-norm transformer every block's norm reads the residual stream. ``normalised_groups="block"``
(the default) keeps the whole block of the teacher whose gates score highest in sum there;
``"mixed"`` keeps the top channels of any teacher (the paper's rule), so each block of the student
reads a stream half of whose features come from another network, and compression is inexact (the
student normalises over the mix, the big student over each teacher's block).

Task: the built-in ``chars`` corpus, ``graphmerge.examples.tiny_gpt`` (RMSNorm, rotary attention),
as ``benchmarks/chars.py``'s full setting: per seed two teachers (2 epochs, lr 0.1) and, from the
same teachers and merge seed, ``graphmerge.merge`` with each selection (gate phase 1 epoch,
fine-tuning 1 epoch, lr 0.05, library defaults otherwise). Reported per merge: the validation
accuracy of the widened big student (= the teachers' mean logits) and of the student right after
compress (as the recipe records them), and the student's test bits per character after
fine-tuning; plus the teachers and teacher A fine-tuned 1 more epoch at lr 0.05 (the user's
cheapest alternative, the same extra epoch).

    python benchmarks/norm_selection.py                 # 3 seeds, ~10 min on one free core
    python benchmarks/norm_selection.py --quick         # 1 seed, a tiny model (smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import graphmerge
from graphmerge.data import chars
from graphmerge.examples.tiny_gpt import TinyGPT
from graphmerge.recipe import train
from graphmerge.training import evaluate

RESULTS = Path(__file__).resolve().parent / "results"
FULL = {"d_model": 64, "n_heads": 4, "n_layers": 2, "context": 64, "n_train": 100_000, "n_val": 20_000,
        "n_test": 20_000, "teacher_epochs": 2}
QUICK = {"d_model": 16, "n_heads": 2, "n_layers": 1, "context": 32, "n_train": 8_000, "n_val": 2_000,
         "n_test": 2_000, "teacher_epochs": 1}
SELECTIONS = ("block", "mixed")


def bits(model: torch.nn.Module, data) -> float:
    return evaluate(model, data, "cross_entropy")["loss"] / math.log(2)


def run_seed(seed: int, s: dict, data: dict) -> dict:
    def build() -> TinyGPT:
        return TinyGPT(d_model=s["d_model"], n_heads=s["n_heads"], n_layers=s["n_layers"], context=s["context"])

    teachers = []
    for index in (1, 2):
        torch.manual_seed(1000 * seed + index)
        teachers.append(train(build(), data["train"], epochs=s["teacher_epochs"], val_data=data["val"], lr=0.1,
                              batch_size=32, seed=1000 * seed + index).model.eval())
    row = {"seed": seed, "teachers": [bits(t, data["test"]) for t in teachers]}
    row["teacher A + 1 epoch"] = bits(train(teachers[0], data["train"], epochs=1, val_data=data["val"], lr=0.05,
                                            batch_size=32, seed=1000 * seed + 9).model.eval(), data["test"])
    for selection in SELECTIONS:
        start = time.perf_counter()
        result = graphmerge.merge(teachers, data["train"], val_data=data["val"], gate_epochs=1, finetune_epochs=1,
                                  weight_lr=0.05, finetune_lr=0.05, batch_size=32, seed=seed,
                                  normalised_groups=selection)
        row[selection] = {
            "student": bits(result.student, data["test"]),
            # the recipe's own validation accuracies (next character)
            "big (val acc)": result.summary["big"],
            "after compress (val acc)": result.summary["before_finetune"],
            "teacher share": result.teacher_share,
            "seconds": time.perf_counter() - start,
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=None, help="seeds (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "norm_selection.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    train_data, val, test, _ = chars(s["context"], s["n_train"], s["n_val"], s["n_test"])
    data = {"train": train_data, "val": val, "test": test}
    rows = []
    for seed in range(args.runs or (1 if args.quick else 3)):
        rows.append(run_seed(seed, s, data))
        print(json.dumps(rows[-1]), file=sys.stderr)
    mean = lambda values: statistics.fmean(values)  # noqa: E731
    table = ["| | " + " | ".join(SELECTIONS) + " |", "|---|" + "---|" * len(SELECTIONS)]
    for key in ("big (val acc)", "after compress (val acc)", "student"):
        table.append(f"| {key} | " + " | ".join(f"{mean([r[sel][key] for r in rows]):.3f}" for sel in SELECTIONS)
                     + " |")
    diffs = [r["block"]["student"] - r["mixed"]["student"] for r in rows]
    lines = [f"chars, {len(rows)} seed(s), test bits/char (mean); teachers "
             f"{mean([r['teachers'][0] for r in rows]):.3f} / {mean([r['teachers'][1] for r in rows]):.3f}, "
             f"teacher A + 1 epoch {mean([r['teacher A + 1 epoch'] for r in rows]):.3f}", *table,
             f"block - mixed (student), per seed: {', '.join(f'{d:+.3f}' for d in diffs)}"]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": s, "rows": rows, "summary": lines, "machine": platform.processor()
                                    or platform.machine(), "threads": args.threads}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Merge two GPT-2 language models with ``transformers.Trainer`` running every training step.

What it does, all on CPU, offline:

1. writes a small built-in text (the source of a few Python standard-library modules, which ship with
   Python) to ``OUT/corpus.txt``, trains a character-level tokenizer on it with the ``tokenizers``
   library, and cuts it into blocks with ``graphmerge.text_dataset`` (the last 10% validate);
2. trains two tiny GPT-2 teachers from two seeds, each in its own ``Trainer`` (the model's own loss
   from ``labels``), and saves them with ``save_pretrained`` (``OUT/teacher0``, ``OUT/teacher1``);
3. widens them into the big student, adds the gates, and runs the gate phase in a ``Trainer`` whose
   ``GatePhaseCallback`` moves the gates to graphmerge's budget schedule after every step;
4. compresses to one GPT-2 of the teachers' size, fine-tunes it in a ``Trainer``, saves it with
   ``save_pretrained`` (``OUT/student``, with the tokenizer) and loads it back with
   ``AutoModelForCausalLM``;
5. prints the validation perplexity of the teachers, the big student and the student before and after
   fine-tuning, and writes them to ``OUT/report.json``.

Run (the defaults: about 4 CPU-minutes, 110k-parameter models; the tiny settings below take seconds)::

    python examples/hf_trainer_merge.py --out runs/hf_trainer_merge
    python examples/hf_trainer_merge.py --out /tmp/tiny --hidden 16 --layers 1 --heads 2 --block-size 32 \\
        --text-chars 8000 --teacher-steps 20 --gate-steps 10 --finetune-steps 10

The same merge from the command line: ``graphmerge merge hf:OUT/teacher0 hf:OUT/teacher1 --data
text:OUT/corpus.txt --out OUT/cli_student``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import graphmerge
from graphmerge.integrations.transformers import GatePhaseCallback

TEXT_MODULES = ("textwrap", "string", "argparse", "functools", "dataclasses", "pathlib")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Output folder (created).")
    parser.add_argument("--hidden", type=int, default=64, help="GPT-2 n_embd.")
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 n_layer.")
    parser.add_argument("--heads", type=int, default=4, help="GPT-2 n_head.")
    parser.add_argument("--block-size", type=int, default=64, help="Tokens per training block.")
    parser.add_argument("--text-chars", type=int, default=40_000, help="Characters of built-in text to use.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--gate-steps", type=int, default=100)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the teachers and student.")
    parser.add_argument("--gate-lr", type=float, default=1e-3,
                        help="AdamW learning rate of the gate phase (weights and gates).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def built_in_text(chars: int) -> str:
    """The source of ``TEXT_MODULES`` (they ship with Python), concatenated, cut to ``chars`` characters."""
    text = "\n".join(inspect.getsource(importlib.import_module(name)) for name in TEXT_MODULES)
    return text[:chars]


def char_tokenizer(text: str) -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer trained on ``text`` (one token per character seen, plus specials)."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="[EOS]")


def training_args(out: Path, steps: int, batch_size: int, lr: float, seed: int, **extra: Any) -> Any:
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        warmup_steps=max(1, steps // 10), lr_scheduler_type="cosine", seed=seed, data_seed=seed, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, **extra)


def next_token_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Position t predicts token t + 1 (what GPT-2 computes from ``labels``); the gated big student
    returns logits only, so Trainer needs the loss spelled out."""
    logits = outputs["logits"]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: Any, batch_size: int) -> float:
    """exp of the mean next-token cross-entropy over the blocks of ``data`` (all of one length)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(len(data), start + batch_size))]
        ids = torch.stack([item["input_ids"] for item in items])
        mask = torch.stack([item["attention_mask"] for item in items])
        output = model(input_ids=ids, attention_mask=mask)
        total += float(next_token_loss(output, ids)) * len(items)
        count += len(items)
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text(built_in_text(args.text_chars), encoding="utf-8")
    tokenizer = char_tokenizer(corpus.read_text(encoding="utf-8"))
    train_data, val_data = graphmerge.text_dataset(corpus, tokenizer, args.block_size).split(0.1)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=args.hidden, n_layer=args.layers,
                                     n_head=args.heads, n_positions=args.block_size,
                                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
    print(f"text: {len(train_data)} training and {len(val_data)} validation blocks of {args.block_size} tokens, "
          f"vocabulary {len(tokenizer)}")

    # 1. two teachers from two seeds, each trained by its own Trainer
    teachers = []
    for index in range(2):
        seed = args.seed + 1 + index
        torch.manual_seed(seed)
        teacher = transformers.GPT2LMHeadModel(config)
        trainer = transformers.Trainer(model=teacher, train_dataset=train_data,
                                       args=training_args(out / "trainer", args.teacher_steps, args.batch_size,
                                                          args.lr, seed))
        trainer.train()
        teacher.save_pretrained(out / f"teacher{index}")
        tokenizer.save_pretrained(out / f"teacher{index}")
        teachers.append(teacher.eval())

    # 2. widen and gate; the gate phase runs in a Trainer driven by GatePhaseCallback
    example = {key: torch.stack([train_data[i][key] for i in range(2)]) for key in ("input_ids", "attention_mask")}
    big = graphmerge.widen(teachers, (example["input_ids"],),
                           example_kwargs={"attention_mask": example["attention_mask"]})
    gated = graphmerge.add_gates(big, seed=args.seed)
    phase = graphmerge.GatePhase(gated, total_steps=args.gate_steps)
    trainer = transformers.Trainer(model=gated, train_dataset=train_data, compute_loss_func=next_token_loss,
                                   callbacks=[GatePhaseCallback(phase)],
                                   args=training_args(out / "trainer", args.gate_steps, args.batch_size,
                                                      args.gate_lr, args.seed, label_names=["labels"]))
    trainer.train()
    open_fraction = gated.open_fraction()

    # 3. compress to the teachers' class and size, then fine-tune it in a Trainer
    student = graphmerge.compress(gated.eval(), "gates")
    before = perplexity(student, val_data, args.batch_size)
    trainer = transformers.Trainer(model=student, train_dataset=train_data,
                                   args=training_args(out / "trainer", args.finetune_steps, args.batch_size,
                                                      args.lr, args.seed))
    trainer.train()
    student.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out / "student", local_files_only=True)

    report = {
        "teachers": [perplexity(t, val_data, args.batch_size) for t in teachers],
        "big_student": perplexity(big, val_data, args.batch_size),
        "student_before_finetune": before,
        "student_after_finetune": perplexity(reloaded, val_data, args.batch_size),
        "open_fraction": {str(k): v for k, v in open_fraction.items()},
        "gate_phase_done": phase.done,
        "parameters": {"teacher": sum(p.numel() for p in teachers[0].parameters()),
                       "student": sum(p.numel() for p in reloaded.parameters())},
        "val_blocks": len(val_data), "block_size": args.block_size, "seconds": time.perf_counter() - start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    rows = [(f"teacher {i}", value) for i, value in enumerate(report["teachers"])]
    rows += [("big student (teachers' mean)", report["big_student"]), ("student before fine-tuning", before),
             ("student after fine-tuning", report["student_after_finetune"])]
    print("validation perplexity (next character):")
    for label, value in rows:
        print(f"  {label:<30}{value:8.3f}")
    print(f"wrote {out / 'student'} ({report['parameters']['student']} parameters, as each teacher) and "
          f"{out / 'report.json'} in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()

"""Hugging Face teachers on the command line: text data, hf:DIR teachers, save_pretrained output.

A corpus is written in tmp_path and a character-level tokenizer trained on it with the ``tokenizers``
library (offline), wrapped in ``PreTrainedTokenizerFast`` and saved into every teacher directory.
Tiny GPT-2, Llama (grouped-query attention: 4 query heads, 2 key/value heads) and Bert (masked LM:
Bert reads the whole block, so next-token prediction would be trivial; text data trains it on BERT's
masked tokens) teachers are trained with ``graphmerge train``, merged with ``graphmerge merge``,
loaded back with ``from_pretrained``, run (``generate`` for the causal LMs, the mask prediction for
Bert), exported with ``graphmerge export`` and checked with onnxruntime against PyTorch. Every
expected value is computed here: the blocks from the tokenizer, the perplexities the command prints
from the loaded models' own ``labels`` loss, the ONNX outputs against the loaded PyTorch model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from graphmerge.errors import GraphMergeError

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

torch.set_num_threads(1)

WORDS = ("the a quick brown lazy fox dog cat jumps runs over under sleeps near far big small red blue green "
         "sees likes").split()
BLOCK = 32
SPECIALS = ["[PAD]", "[UNK]", "[MASK]", "[EOS]"]

# name -> (class, config class, config keywords besides the vocabulary)
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=3,
                                                  eos_token_id=3, pad_token_id=0)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=2,
                                                     max_position_embeddings=64, pad_token_id=0, bos_token_id=3,
                                                     eos_token_id=3)),
    "bert": ("BertForMaskedLM", "BertConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, max_position_embeddings=64,
                                                  pad_token_id=0)),
}


def corpus_text(lines: int, seed: int = 0) -> str:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (lines, 7), generator=generator)
    return "\n".join(" ".join(WORDS[int(i)] for i in row) + "." for row in picks)


def char_tokenizer(text: str) -> Any:
    """One token per character of ``text`` plus the specials, offline (the ``tokenizers`` library)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                                mask_token="[MASK]", eos_token="[EOS]")


def save_teacher(arch: str, path: Path, tokenizer: Any, seed: int, *, with_tokenizer: bool = True,
                 **overrides: Any) -> Path:
    cls, config_cls, kwargs = ARCHS[arch]
    config = getattr(transformers, config_cls)(vocab_size=len(tokenizer), **{**kwargs, **overrides})
    torch.manual_seed(seed)
    getattr(transformers, cls)(config).save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> tuple[Path, Any]:
    """(corpus.txt of 150 sentences, its character tokenizer)."""
    root = tmp_path_factory.mktemp("hf_text")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(150))
    return corpus, char_tokenizer(corpus.read_text())


def cli(*args: str | Path) -> Any:
    from typer.testing import CliRunner

    from graphmerge.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_ok(result: Any) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def assert_refused(result: Any, out: Path, *fragments: str) -> str:
    """Exit code 2, one ``error:`` paragraph naming every fragment, nothing at ``out`` nor beside it."""
    assert result.exit_code == 2, (result.output, result.exception)
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not out.exists(), sorted(out.parent.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return message


def blocks_of(text: str, tokenizer: Any) -> torch.Tensor:
    """The corpus cut as the module docstring of graphmerge.text_data says, computed from the tokenizer."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    count = len(ids) // BLOCK
    return torch.tensor(ids[:count * BLOCK]).reshape(count, BLOCK)


def printed_perplexities(stdout: str) -> dict[str, float]:
    line = next(line for line in stdout.splitlines() if line.startswith("perplexity ("))
    return {name: float(value) for name, value in re.findall(r"([a-z][\w .-]*?) (\d+\.\d+)", line.split(": ", 1)[1])}


# --- text data ------------------------------------------------------------------------------

def test_text_dataset_packs_sorted_files_into_blocks_and_splits_the_last_tenth(tmp_path, text) -> None:
    import graphmerge

    _, tokenizer = text
    folder = tmp_path / "texts"
    (folder / "b").mkdir(parents=True)
    parts = {"b/z.txt": corpus_text(30, 1), "a.txt": corpus_text(40, 2), "b/c.txt": corpus_text(20, 3)}
    for name, body in parts.items():
        (folder / name).write_text(body)
    (folder / "notes.md").write_text("not text data")
    data = graphmerge.text_dataset(folder, tokenizer, BLOCK)
    ids: list[int] = []
    for name in ("a.txt", "b/c.txt", "b/z.txt"):
        ids += tokenizer(parts[name], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    expected = torch.tensor(ids[:len(ids) // BLOCK * BLOCK]).reshape(-1, BLOCK)
    assert torch.equal(data.blocks, expected)
    item = data[3]
    assert torch.equal(item["input_ids"], expected[3]) and torch.equal(item["labels"], expected[3])
    assert torch.equal(item["attention_mask"], torch.ones(BLOCK, dtype=torch.long))
    train, val = data.split(0.1)
    n_val = max(1, len(expected) // 10)
    assert torch.equal(val.blocks, expected[-n_val:]) and torch.equal(train.blocks, expected[:-n_val])
    length = len(tokenizer(parts["a.txt"], add_special_tokens=False)["input_ids"])  # + 1 end-of-text token
    single, none = graphmerge.text_dataset(folder / "a.txt", tokenizer, length).split(0.1)
    assert none is None and len(single) == 1  # one block: it trains, nothing validates


def test_masked_lm_blocks_mask_as_bert_and_the_loss_is_bert_s_own(text) -> None:
    from graphmerge.text_data import masked_lm, text_dataset

    corpus, tokenizer = text
    data = text_dataset(corpus, tokenizer, BLOCK, objective="masked_lm")
    plain = blocks_of(corpus.read_text(), tokenizer)
    again = text_dataset(corpus, tokenizer, BLOCK, objective="masked_lm")
    masked_positions = 0
    for index in range(len(data)):
        item = data[index]
        chosen = item["labels"] != -100
        assert int(chosen.sum()) == round(0.15 * BLOCK)
        assert torch.equal(item["labels"][chosen], plain[index][chosen])
        assert torch.equal(item["input_ids"][~chosen], plain[index][~chosen])  # only chosen positions change
        masked_positions += int((item["input_ids"][chosen] == tokenizer.mask_token_id).sum())
        assert torch.equal(item["input_ids"], again[index]["input_ids"])  # the same masks on every run
    total = len(data) * round(0.15 * BLOCK)
    assert 0.7 < masked_positions / total < 0.9  # 80% of the chosen tokens read [MASK]
    _, val = data.split(0.1)
    assert torch.equal(val[0]["labels"], data[len(data) - len(val)]["labels"])  # masks follow the blocks
    cls, config_cls, kwargs = ARCHS["bert"]
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(vocab_size=len(tokenizer), **kwargs)).eval()
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        output = model(**batch)
    assert float(masked_lm(output.logits, batch["labels"])) == pytest.approx(float(output.loss), rel=1e-5)


def test_a_datasets_dataset_trains_and_unformatted_lists_are_refused(text) -> None:
    datasets = pytest.importorskip("datasets")
    from graphmerge.data import first_example
    from graphmerge.recipe import train

    corpus, tokenizer = text
    blocks = blocks_of(corpus.read_text(), tokenizer)
    rows = {"input_ids": blocks.tolist(), "attention_mask": torch.ones_like(blocks).tolist(),
            "labels": blocks.tolist()}
    raw = datasets.Dataset.from_dict(rows)
    with pytest.raises(GraphMergeError, match=r"with_format\('torch'\)"):
        first_example(raw)
    cls, config_cls, kwargs = ARCHS["gpt2"]
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(vocab_size=len(tokenizer), **kwargs))
    data = raw.with_format("torch")
    with torch.no_grad():
        before = float(model.eval()(input_ids=blocks, labels=blocks).loss)
    result = train(model, data, epochs=2, loss="causal_lm", lr=0.1, batch_size=16, seed=0)
    with torch.no_grad():
        after = float(model.eval()(input_ids=blocks, labels=blocks).loss)  # the model's own loss, independently
    assert after < before - 0.5, (before, after)
    assert result.metrics["loss"] == pytest.approx(after, rel=1e-4)


# --- bad inputs -----------------------------------------------------------------------------

def test_a_teacher_without_a_tokenizer_is_refused(tmp_path, text) -> None:
    corpus, tokenizer = text
    good = save_teacher("gpt2", tmp_path / "good", tokenizer, 1)
    bare = save_teacher("gpt2", tmp_path / "bare", tokenizer, 2, with_tokenizer=False)
    out = tmp_path / "student"
    message = assert_refused(cli("merge", f"hf:{good}", f"hf:{bare}", "--data", f"text:{corpus}", "--out", out),
                             out, f"hf:{bare} has no tokenizer", "tokenizer.save_pretrained")
    assert "config.json" in message  # what the directory holds instead
    assert_refused(cli("train", f"hf:{bare}", "--data", f"text:{corpus}", "--out", out), out,
                   f"hf:{bare} has no tokenizer")


def test_teachers_of_different_configs_are_refused_naming_the_keys(tmp_path, text) -> None:
    corpus, tokenizer = text
    small = save_teacher("gpt2", tmp_path / "small", tokenizer, 1)
    large = save_teacher("gpt2", tmp_path / "large", tokenizer, 2, n_layer=3, n_embd=48)
    out = tmp_path / "student"
    message = assert_refused(cli("merge", f"hf:{small}", f"hf:{large}", "--data", f"text:{corpus}", "--out", out),
                             out, "different configs", "n_embd 32 vs 48", "n_layer 2 vs 3", "same config")
    assert "n_head" not in message  # only the keys that differ


def test_a_text_too_short_for_one_block_is_refused_with_its_token_count(tmp_path, text) -> None:
    _, tokenizer = text
    teachers = [save_teacher("gpt2", tmp_path / f"t{i}", tokenizer, i) for i in (1, 2)]
    short = tmp_path / "short.txt"
    short.write_text("the quick fox.")
    tokens = len(tokenizer("the quick fox.", add_special_tokens=False)["input_ids"]) + 1  # + the end-of-text token
    out = tmp_path / "student"
    assert_refused(cli("merge", *(f"hf:{t}" for t in teachers), "--data", f"text:{short}", "--out", out,
                       "--block-size", "20"),
                   out, f"gives {tokens} tokens", "one block of 20 tokens", "--block-size")
    assert_refused(cli("train", f"hf:{teachers[0]}", "--data", f"text:{short}", "--out", out), out,
                   f"gives {tokens} tokens", "one block of 64 tokens")  # default 128, capped by n_positions 64


def test_hf_teachers_mixed_with_weight_files_are_refused(tmp_path, text) -> None:
    corpus, tokenizer = text
    teachers = [save_teacher("gpt2", tmp_path / f"t{i}", tokenizer, i) for i in (1, 2)]
    weights = teachers[0] / "model.safetensors"
    out = tmp_path / "student"
    for specs in ([f"hf:{teachers[0]}", f"hf:{teachers[1]}"], [f"hf:{teachers[0]}"]):
        assert_refused(cli("merge", *specs, "-t", weights, "-t", weights, "--data", f"text:{corpus}", "--out", out),
                       out, "-t/--teacher", "use one form", "drop -t")


def test_a_failed_save_leaves_the_earlier_output_and_no_temporary_files(tmp_path, text, monkeypatch) -> None:
    from graphmerge import hf

    _, tokenizer = text
    cls, config_cls, kwargs = ARCHS["gpt2"]
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(vocab_size=len(tokenizer), **kwargs))
    out = tmp_path / "model"
    hf.save_pretrained_atomic(model, tokenizer, out)
    first = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)

    def broken(model: Any, directory: Path) -> None:
        raise GraphMergeError("round trip failed")

    monkeypatch.setattr(hf, "check_round_trip", broken)
    with pytest.raises(GraphMergeError, match="round trip failed"):
        hf.save_pretrained_atomic(model, tokenizer, out)
    assert (out / "model.safetensors").read_bytes() == first
    monkeypatch.undo()
    hf.save_pretrained_atomic(model, tokenizer, out)  # replaces the earlier output
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True)
    assert torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- train, merge, load, generate, export ---------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", pytest.param("llama", marks=pytest.mark.slow),
                                  pytest.param("bert", marks=pytest.mark.slow)])
def test_train_merge_load_generate_and_export(tmp_path, text, arch) -> None:
    import onnx
    import onnxruntime
    from safetensors.torch import load_file

    corpus, tokenizer = text
    cls = getattr(transformers, ARCHS[arch][0])
    causal = arch != "bert"
    common = ["--data", f"text:{corpus}", "--block-size", BLOCK, "--batch-size", 16]
    teachers = []
    for seed in (1, 2):
        start = save_teacher(arch, tmp_path / f"init{seed}", tokenizer, seed)
        teachers.append(tmp_path / f"teacher{seed}")
        stdout = assert_ok(cli("train", f"hf:{start}", *common, "--out", teachers[-1], "--epochs", 1, "--lr", 0.1,
                               "--seed", seed))
        assert f"wrote {teachers[-1]}" in stdout and "perplexity" in stdout
    student_dir = tmp_path / "student"
    stdout = assert_ok(cli("merge", *(f"hf:{t}" for t in teachers), *common, "--out", student_dir,
                           "--gate-epochs", 1, "--finetune-epochs", 1, "--lr", 0.05, "--finetune-lr", 0.05))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    student = auto.from_pretrained(student_dir, local_files_only=True).eval()
    teacher = cls.from_pretrained(teachers[0], local_files_only=True).eval()
    assert type(student) is cls
    config = json.loads((student_dir / "config.json").read_text())
    teacher_config = json.loads((teachers[0] / "config.json").read_text())
    assert config["architectures"] == [cls.__name__]
    assert {k: v for k, v in config.items() if k != "transformers_version"} == \
        {k: v for k, v in teacher_config.items() if k != "transformers_version"}
    # the student is the teachers' architecture: same names and shapes, strict load into a fresh instance
    assert {k: v.shape for k, v in student.state_dict().items()} == {k: v.shape for k, v in
                                                                     teacher.state_dict().items()}
    fresh = cls(student.config)
    fresh.load_state_dict(student.state_dict(), strict=True)
    for key, tensor in load_file(student_dir / "model.safetensors").items():
        assert torch.equal(tensor, student.state_dict()[key]), key
    saved_tokenizer = transformers.AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    assert saved_tokenizer.get_vocab() == tokenizer.get_vocab()

    val = blocks_of(corpus.read_text(), tokenizer)[-max(1, len(blocks_of(corpus.read_text(), tokenizer)) // 10):]
    printed = printed_perplexities(stdout)
    assert set(printed) >= {"teacher teacher1", "teacher teacher2", "big student", "student before fine-tuning",
                            "student after fine-tuning"}, printed
    assert all(math.isfinite(v) and v > 1 for v in printed.values()), printed
    prompt = torch.tensor([tokenizer("the quick", add_special_tokens=False)["input_ids"]])
    if causal:  # the printed perplexities are exp of the models' own next-token loss on the last 10% of blocks
        for name, model in (("teacher teacher1", teacher), ("student after fine-tuning", student)):
            with torch.no_grad():
                expected = math.exp(float(model(input_ids=val, labels=val).loss))
            assert printed[name] == pytest.approx(expected, rel=1e-3, abs=1e-3), name
        with torch.no_grad():
            generated = student.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                         min_new_tokens=6, do_sample=False, pad_token_id=0)
            first = int(student(input_ids=prompt).logits[0, -1].argmax())
        assert generated.shape == (1, prompt.shape[1] + 6) and torch.equal(generated[0, :prompt.shape[1]], prompt[0])
        assert int(generated[0, prompt.shape[1]]) == first  # greedy: the model's own most likely next token
    else:  # a masked LM does not generate; it fills the mask
        masked = prompt.clone()
        masked[0, 2] = tokenizer.mask_token_id
        with torch.no_grad():
            logits = student(input_ids=masked).logits
        assert logits.shape == (1, prompt.shape[1], len(tokenizer)) and torch.isfinite(logits).all()

    onnx_path = tmp_path / "student.onnx"
    stdout = assert_ok(cli("export", f"hf:{student_dir}", "--out", onnx_path))
    proto = onnx.load(str(onnx_path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    for value in proto.graph.input:  # batch and sequence are symbolic
        assert all(d.dim_param and not d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), value
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ids = torch.randint(4, len(tokenizer), (3, 11), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a right-padded row
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        reference = student(input_ids=ids, attention_mask=mask).logits
    # float32 reassociation of a 2-layer width-32 network is ~1e-6 of the logits' scale; a wrong op is O(1)
    tolerance = 1e-4 * max(1.0, float(reference.abs().max()))
    assert float((torch.from_numpy(got) - reference).abs().max()) <= tolerance
    assert F.softmax(torch.from_numpy(got), -1).argmax(-1).equal(reference.argmax(-1))

    if arch == "gpt2":  # the benchmark takes the same model (and exports it itself)
        bench_json = tmp_path / "bench.json"
        assert_ok(cli("bench", f"hf:{student_dir}", "--batch", "2", "--min-time", "0", "--min-iters", "2",
                      "--warmup", "0", "--json", bench_json))
        rows = json.loads(bench_json.read_text())["rows"]
        assert {(r["runtime"], r["status"]) for r in rows} >= {("onnxruntime", "ok"), ("torch", "ok")}, rows
        assert all(r["parity_max_rel"] <= 1e-4 for r in rows if r["runtime"] == "onnxruntime")

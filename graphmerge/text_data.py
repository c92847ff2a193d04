"""Plain text as a language-modelling data set: ``--data text:PATH`` and :func:`text_dataset`.

The text is a ``.txt`` file or a directory of them (every ``*.txt`` below it, read in sorted order
of their relative paths, as UTF-8). Each file is tokenised on its own with the model's tokenizer
(no special tokens added) and followed by the tokenizer's end-of-sequence token when it has one, so
that documents stay apart; the token stream of all files is then cut into consecutive blocks of
``block_size`` tokens, and the tokens after the last whole block are dropped.

Items are dicts of tensors, what a Hugging Face model takes as keywords plus the target:

- ``objective="causal_lm"``: ``input_ids`` = the block, ``attention_mask`` = ones, ``labels`` = the
  block; the loss (``loss="causal_lm"``) shifts, so position t predicts token t + 1.
- ``objective="masked_lm"``: BERT's masking, drawn once per block from a generator seeded by
  ``(seed, block index)`` so every epoch and every run sees the same masks: ``mask_fraction`` of the
  positions (at least one) are predicted; of those, 80% read the tokenizer's mask token, 10% a random
  token, 10% the original. ``labels`` hold the original token there and -100 elsewhere; the loss is
  :func:`masked_lm`.

:meth:`TextBlocks.split` gives the validation split: the last ``val_fraction`` of the blocks (at
least one when there are two or more blocks; none with a single block), the blocks before it train.
The split is by position in the stream, so it is the same on every run, and with a directory the
validation text is the end of the last files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from graphmerge.errors import GraphMergeError

__all__ = ["OBJECTIVES", "TextBlocks", "masked_lm", "read_texts", "text_dataset"]

OBJECTIVES = ("causal_lm", "masked_lm")
DEFAULT_BLOCK_SIZE = 128
IGNORE_INDEX = -100  # the label Hugging Face losses and F.cross_entropy skip


class TextBlocks(Dataset):
    """Token blocks of one text corpus as dicts ``{input_ids, attention_mask, labels}`` (see the module
    docstring). ``blocks`` is the (n, block_size) int64 tensor of token ids."""

    def __init__(self, blocks: torch.Tensor, *, objective: str = "causal_lm", mask_token_id: int | None = None,
                 vocab_size: int | None = None, mask_fraction: float = 0.15, seed: int = 0,
                 first_index: int = 0, source: str = "text") -> None:
        if objective not in OBJECTIVES:
            raise GraphMergeError(f"unknown text objective {objective!r}: use 'causal_lm' (next-token prediction) "
                                  f"or 'masked_lm' (BERT's masked tokens).")
        if objective == "masked_lm" and (mask_token_id is None or vocab_size is None):
            raise GraphMergeError("masked_lm text data needs the tokenizer's mask token and its vocabulary size; "
                                  "give a tokenizer with a mask_token.")
        self.blocks, self.objective, self.source = blocks, objective, source
        self.mask_token_id, self.vocab_size = mask_token_id, vocab_size
        self.mask_fraction, self.seed, self.first_index = mask_fraction, seed, first_index

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        mask = torch.ones_like(ids)
        if self.objective == "causal_lm":
            return {"input_ids": ids, "attention_mask": mask, "labels": ids}
        inputs, labels = self._masked(ids, self.first_index + int(index))
        return {"input_ids": inputs, "attention_mask": mask, "labels": labels}

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[1])

    def split(self, val_fraction: float = 0.1) -> tuple[TextBlocks, TextBlocks | None]:
        """``(train, val)``: the last ``val_fraction`` of the blocks validate (at least one when there are
        two or more blocks), the rest train; with one block, ``(all, None)``. Masks follow the blocks."""
        if not 0 <= val_fraction < 1:
            raise GraphMergeError(f"val_fraction must lie in [0, 1), got {val_fraction}.")
        n = len(self.blocks)
        n_val = 0 if n < 2 or val_fraction == 0 else max(1, int(n * val_fraction))
        cut = n - n_val
        train = self._part(0, cut)
        return train, (self._part(cut, n) if n_val else None)

    def _part(self, start: int, stop: int) -> TextBlocks:
        return TextBlocks(self.blocks[start:stop], objective=self.objective, mask_token_id=self.mask_token_id,
                          vocab_size=self.vocab_size, mask_fraction=self.mask_fraction, seed=self.seed,
                          first_index=self.first_index + start, source=self.source)

    def _masked(self, ids: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = len(ids)
        chosen = torch.randperm(n, generator=generator)[:max(1, round(n * self.mask_fraction))]
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[chosen] = ids[chosen]
        inputs = ids.clone()
        roll = torch.rand(len(chosen), generator=generator)
        random_ids = torch.randint(0, self.vocab_size, (len(chosen),), generator=generator)
        inputs[chosen[roll < 0.8]] = self.mask_token_id
        randomised = (roll >= 0.8) & (roll < 0.9)
        inputs[chosen[randomised]] = random_ids[randomised]
        return inputs, labels


def masked_lm(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, T, V) logits at the positions whose label is not -100 (the masked tokens);
    what ``BertForMaskedLM`` computes from ``labels``. exp of it is the masked tokens' perplexity."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def read_texts(path: str | Path) -> list[tuple[Path, str]]:
    """``[(file, text)]`` of a ``.txt`` file, or of every ``*.txt`` under a directory in sorted order."""
    root = Path(path).expanduser()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(root.rglob("*.txt"), key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise GraphMergeError(f"text:{path}: the directory {root} holds no .txt file. Put the training text in "
                                  f"UTF-8 .txt files there, or point text: at one .txt file.")
    else:
        raise GraphMergeError(f"text:{path}: {root} does not exist (resolved to {root.resolve()}). Point text: at a "
                              f".txt file or a directory of .txt files.")
    texts = []
    for file in files:
        try:
            texts.append((file, file.read_text(encoding="utf-8")))
        except UnicodeDecodeError as exc:
            raise GraphMergeError(f"text:{path}: {file} is not UTF-8 text ({exc.reason} at byte {exc.start}). "
                                  f"Convert it to UTF-8 (e.g. iconv -t utf-8) or remove it.") from exc
    return texts


def text_dataset(path: str | Path, tokenizer: Any, block_size: int = DEFAULT_BLOCK_SIZE, *,
                 objective: str = "causal_lm", mask_fraction: float = 0.15, seed: int = 0) -> TextBlocks:
    """The text at ``path`` tokenised with ``tokenizer`` (a Hugging Face tokenizer) and packed into blocks
    of ``block_size`` tokens (see the module docstring); ``.split(val_fraction)`` gives train and
    validation sets. ``objective``: ``"causal_lm"`` or ``"masked_lm"``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise GraphMergeError(f"block_size must be a whole number of tokens, at least 2, got {block_size!r}.")
    if objective not in OBJECTIVES:
        raise GraphMergeError(f"unknown text objective {objective!r}: use 'causal_lm' or 'masked_lm'.")
    if not 0 < mask_fraction <= 1:
        raise GraphMergeError(f"mask_fraction must lie in (0, 1], got {mask_fraction}.")
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if objective == "masked_lm" and mask_id is None:
        raise GraphMergeError(f"text:{path}: masked-LM training replaces tokens by the tokenizer's mask token, and "
                              f"this tokenizer has none. Save a tokenizer with a mask_token (e.g. '[MASK]') into "
                              f"the model's directory.")
    texts = read_texts(path)
    ids = _tokenise(texts, tokenizer)
    count = len(ids) // block_size
    if count == 0:
        files = texts[0][0] if len(texts) == 1 else f"the {len(texts)} .txt files under {path}"
        raise GraphMergeError(f"text:{path}: {files} gives {len(ids)} tokens with this tokenizer, fewer than one "
                              f"block of {block_size} tokens (--block-size {block_size}). Give more text, or a "
                              f"smaller --block-size (at most {max(2, len(ids))}).")
    blocks = torch.tensor(ids[:count * block_size], dtype=torch.long).reshape(count, block_size)
    return TextBlocks(blocks, objective=objective, mask_token_id=mask_id, vocab_size=len(tokenizer),
                      mask_fraction=mask_fraction, seed=seed, source=str(path))


def _tokenise(texts: Sequence[tuple[Path, str]], tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for _, text in texts:
        # verbose=False: a corpus is longer than model_max_length by design; the blocks are not
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    return ids

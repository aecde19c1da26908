"""Gemma SentencePiece tokenizer with PaliGemma's `<locNNNN>` and `<segNNN>` pieces.

Ids of special pieces are looked up by piece, never assumed, so the published tokenizer (loc pieces at
256000+) and our small demo tokenizer (loc pieces right after the specials) work the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from .config import CheckpointError

NUM_LOC = 1024  # location bins over the image height (y) or width (x)
NUM_SEG = 128  # codes of the mask VQ-VAE's codebook
SEG_TOKENS_PER_MASK = 16  # one mask is a 4×4 grid of codes
LOC_PIECES = [f"<loc{i:04d}>" for i in range(NUM_LOC)]
SEG_PIECES = [f"<seg{i:03d}>" for i in range(NUM_SEG)]
# Gemma's layout of the special ids; training a tokenizer keeps it so checkpoints agree on them.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer:
    """Encodes prompts as [bos] + prompt + "\\n" and decodes with loc/seg tokens kept as text."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"tokenizer file not found: {path} (expected a SentencePiece .model file)")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as err:
            raise CheckpointError(f"{path} is not a SentencePiece model file: {err}") from None
        self.path = path
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id, self.eos_id, self.pad_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        newline = self._sp.EncodeAsIds("\n")
        if len(newline) != 1:
            raise CheckpointError(f"{path}: '\\n' is not a single piece, so it is not a PaliGemma tokenizer")
        self.newline_id = newline[0]
        self.loc_ids = self._ids_of(LOC_PIECES)
        self.seg_ids = self._ids_of(SEG_PIECES)

    def _ids_of(self, pieces: Sequence[str]) -> list[int] | None:
        ids = [self._sp.PieceToId(p) for p in pieces]
        return None if self._sp.unk_id() in ids else ids

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_prompt(self, prompt: str) -> list[int]:
        """The prefix PaliGemma expects: [bos] + prompt + "\\n"."""
        return [self.bos_id, *self.encode(prompt), self.newline_id]

    def until_eos(self, ids: Iterable[int]) -> list[int]:
        """The ids before the first EOS (all of them when there is none)."""
        ids = [int(i) for i in ids]
        return ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids up to the first EOS; pad/bos vanish, loc/seg tokens stay as text."""
        return self._sp.DecodeIds(self.until_eos(ids))


def train_tokenizer(texts: Iterable[str], model_prefix: str, text_pieces: int = 512) -> Tokenizer:
    """Trains a small Gemma-layout tokenizer (pad 0, eos 1, bos 2, unk 3, byte fallback) whose user pieces
    are "\\n", the 1024 loc and the 128 seg pieces. Writes `{model_prefix}.model` and returns it loaded."""
    user_pieces = ["\n", *LOC_PIECES, *SEG_PIECES]
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(list(texts)),
        model_prefix=model_prefix,
        model_type="bpe",
        vocab_size=4 + len(user_pieces) + 256 + text_pieces,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        user_defined_symbols=user_pieces,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return Tokenizer(f"{model_prefix}.model")

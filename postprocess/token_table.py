"""The token inspector: one row per generated token with its probability, alternatives and meaning.

    rows = token_rows(scores.token_ids, scores.logprobs, scores.top_ids, scores.top_logprobs, model.tokenizer,
                      width, height, object_spans=[c.token_span for c in confidences])
    value = table_values(rows, labels)       # for gr.Dataframe(headers=TOKEN_COLUMNS)
    rows[clicked].object_index               # the object to highlight, or None

A token's text is the text it adds after the tokens before it (so " cat" shows its space; of the bytes of a
multi-byte character the first ones show "�" and the last the character), with spaces and newlines made
visible. A loc token is read as a bin and a pixel: which edge it is (y1, x1, y2, x2) comes from its place in its
run of consecutive loc tokens, and the pixel follows `bin_to_pixel` over the image's height (y) or width (x),
as parse() maps bins.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from postprocess.confidence import EDGES
from postprocess.parse import bin_to_pixel

TOKEN_COLUMNS = ["#", "token", "probability", "top-5 alternatives", "location / code", "object"]
CONTEXT_TOKENS = 8  # tokens decoded before one to read the text it adds (enough for a 4-byte character)
_VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥"})


@dataclasses.dataclass(frozen=True)
class TokenRow:
    """kind: "loc", "seg" or "text"; edge/bin/pixel for loc tokens, code for seg tokens, else None.
    object_index: the object (0-based, in the order of parse's objects) whose tokens hold this one, or None."""

    index: int
    token_id: int
    text: str
    prob: float
    alternatives: list[tuple[str, float]]
    kind: str
    edge: str | None = None
    bin: int | None = None
    pixel: int | None = None
    code: int | None = None
    object_index: int | None = None

    def location(self) -> str:
        if self.kind == "loc":
            return f"{self.edge}: bin {self.bin} → {self.pixel} px"
        return f"code {self.code}" if self.kind == "seg" else ""


def token_rows(
    token_ids: Sequence[int],
    logprobs,
    top_ids,
    top_logprobs,
    tokenizer,
    width: int,
    height: int,
    object_spans: Sequence[tuple[int, int]] = (),
) -> list[TokenRow]:
    """One TokenRow per generated token.

    logprobs float[n]; top_ids int[n, k], top_logprobs float[n, k] (best first; -inf entries are skipped);
    tokenizer: a paligemma.Tokenizer (decode, loc_ids, seg_ids, eos/bos/pad ids); width, height: the original
    image's size; object_spans: per object the [start, end) of its tokens (confidence's token_span).
    """
    ids = [int(i) for i in token_ids]
    logprobs = np.asarray(logprobs, np.float64)
    top_ids, top_logprobs = np.asarray(top_ids, np.int64), np.asarray(top_logprobs, np.float64)
    n = len(ids)
    if logprobs.shape != (n,) or top_ids.ndim != 2 or top_ids.shape[0] != n or top_logprobs.shape != top_ids.shape:
        raise ValueError(
            f"need one log-probability and one row of top alternatives per token: {n} tokens, "
            f"logprobs {logprobs.shape}, top_ids {top_ids.shape}, top_logprobs {top_logprobs.shape}"
        )
    loc_bin = {token: index for index, token in enumerate(tokenizer.loc_ids or ())}
    seg_code = {token: index for index, token in enumerate(tokenizer.seg_ids or ())}
    owner = {i: number for number, (start, end) in enumerate(object_spans) for i in range(start, end)}
    rows, run = [], 0  # run: loc tokens right before this one
    for i, token in enumerate(ids):
        context = ids[max(0, i - CONTEXT_TOKENS) : i]
        head = tokenizer.decode(context)
        alternatives = [
            (_added_text(tokenizer, context, head, int(alt)), math.exp(lp))
            for alt, lp in zip(top_ids[i], top_logprobs[i])
            if np.isfinite(lp)
        ]
        common = {
            "index": i,
            "token_id": token,
            "text": _added_text(tokenizer, context, head, token),
            "prob": math.exp(logprobs[i]),
            "alternatives": alternatives,
            "object_index": owner.get(i),
        }
        if token in loc_bin:
            edge = EDGES[run % 4]
            size = height if edge[0] == "y" else width
            rows.append(
                TokenRow(**common, kind="loc", edge=edge, bin=loc_bin[token], pixel=bin_to_pixel(loc_bin[token], size))
            )
            run += 1
        else:
            kind = "seg" if token in seg_code else "text"
            rows.append(TokenRow(**common, kind=kind, code=seg_code.get(token)))
            run = 0
    return rows


def table_values(rows: Sequence[TokenRow], labels: Sequence[str] | None = None) -> list[list]:
    """The rows as gr.Dataframe values under TOKEN_COLUMNS; the object column reads "1 cat" with `labels`, else "1"."""

    def owner(row: TokenRow) -> str:
        if row.object_index is None:
            return ""
        number = str(row.object_index + 1)
        return f"{number} {labels[row.object_index]}" if labels is not None else number

    return [
        [
            row.index,
            row.text,
            round(row.prob, 4),
            " · ".join(f"{text} {prob:.3f}" for text, prob in row.alternatives),
            row.location(),
            owner(row),
        ]
        for row in rows
    ]


def _added_text(tokenizer, context: list[int], head: str, token: int) -> str:
    """The visible text `token` adds after `context` (whose text is `head`); special tokens by name."""
    named = {tokenizer.eos_id: "<eos>", tokenizer.bos_id: "<bos>", tokenizer.pad_id: "<pad>"}
    if token in named:
        return named[token]
    full = tokenizer.decode([*context, token])
    text = full[len(os.path.commonprefix([head, full])) :]  # a byte that ends a character replaces the "�" before
    return text.translate(_VISIBLE) if text else "∅"

"""The token inspector's rows: readable text, probabilities, alternatives, loc tokens as bins and pixels, owners."""

from pathlib import Path

import numpy as np
import pytest

import paligemma
from postprocess.token_table import TOKEN_COLUMNS, table_values, token_rows

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "demo" / "tokenizer.model"
W, H = 640, 480


@pytest.fixture(scope="module")
def tok():
    return paligemma.Tokenizer(str(TOKENIZER))


def _scores(ids, probs, alternatives):
    """logprobs of `probs`; top-5 rows of (id, prob) pairs padded with -inf."""
    top_ids = np.zeros((len(ids), 5), np.int32)
    top_logprobs = np.full((len(ids), 5), -np.inf, np.float32)
    for i, row in enumerate(alternatives):
        for j, (alt, prob) in enumerate(row):
            top_ids[i, j], top_logprobs[i, j] = alt, np.log(prob)
    return np.log(np.asarray(probs, np.float32)), top_ids, top_logprobs


def test_rows_read_loc_seg_and_text_tokens(tok):
    loc, seg = tok.loc_ids, tok.seg_ids
    label = tok.encode(" red circle")
    ids = [
        loc[256],
        loc[512],
        loc[768],
        loc[1000],
        *label,
        *tok.encode(" ;"),
        loc[10],
        loc[20],
        loc[30],
        loc[40],
        seg[7],
        *[seg[0]] * 15,
        loc[1],
        loc[2],
        loc[3],
        loc[4],
        loc[5],
    ]
    probs = np.linspace(0.95, 0.4, len(ids))
    alternatives = [[(t, p), (loc[257], 0.02), (tok.eos_id, 0.01)] for t, p in zip(ids, probs)]
    first_span, second_span = (0, 4 + len(label) + 1), (4 + len(label) + 1, 4 + len(label) + 1 + 20)
    rows = token_rows(ids, *_scores(ids, probs, alternatives), tok, W, H, [first_span, second_span])
    assert len(rows) == len(ids)
    y1, x1, y2, x2 = rows[:4]
    assert [r.edge for r in rows[:4]] == ["y1", "x1", "y2", "x2"] and all(r.kind == "loc" for r in rows[:4])
    assert (y1.bin, y1.pixel) == (256, 120) and (x1.bin, x1.pixel) == (512, 320)  # y over 480, x over 640
    assert (y2.pixel, x2.pixel) == (360, 625)
    assert y1.location() == "y1: bin 256 → 120 px"
    assert [r.text for r in rows[4 : 4 + len(label)]] == ["␣red", "␣circle"] and rows[4].kind == "text"
    assert rows[0].text == "<loc0256>" and rows[0].prob == pytest.approx(0.95, rel=1e-6)
    assert [text for text, _ in rows[0].alternatives] == ["<loc0256>", "<loc0257>", "<eos>"]  # -inf left out
    assert rows[0].alternatives[1][1] == pytest.approx(0.02, rel=1e-5)
    mask = rows[first_span[1] + 4]
    assert (mask.kind, mask.code, mask.location()) == ("seg", 7, "code 7")
    assert [r.object_index for r in rows] == [0] * first_span[1] + [1] * 20 + [None] * 5
    tail = rows[-5:]  # five loc tokens in a row, no object: edges count on, y1 again after x2
    assert [r.edge for r in tail] == ["y1", "x1", "y2", "x2", "y1"]


def test_multibyte_text_and_visible_whitespace(tok):
    ids = tok.encode(" café ✓\n")
    rows = token_rows(ids, *_scores(ids, [0.5] * len(ids), [[(t, 0.5)] for t in ids]), tok, W, H)
    texts = [r.text for r in rows]
    assert "".join(texts).replace("�", "") == "␣café␣✓↵"  # the last byte of a character shows it whole
    assert all(r.object_index is None for r in rows)


def test_table_values_for_the_dataframe(tok):
    ids = [tok.loc_ids[100], *tok.encode(" red")]
    rows = token_rows(
        ids, *_scores(ids, [0.9, 0.5], [[(ids[0], 0.9), (tok.loc_ids[99], 0.05)], [(ids[1], 0.5)]]), tok, W, H, [(0, 2)]
    )
    values = table_values(rows, ["red circle"])
    assert len(values[0]) == len(TOKEN_COLUMNS)
    assert values[0] == [
        0,
        "<loc0100>",
        0.9,
        "<loc0100> 0.900 · <loc0099> 0.050",
        "y1: bin 100 → 47 px",
        "1 red circle",
    ]
    assert values[1][1] == "␣red" and values[1][4] == ""
    assert table_values(rows)[0][5] == "1"


def test_mismatched_scores_are_refused(tok):
    with pytest.raises(ValueError, match="one log-probability"):
        token_rows([5, 6], np.zeros(3), np.zeros((2, 5)), np.zeros((2, 5)), tok, W, H)
    with pytest.raises(ValueError, match="one log-probability"):
        token_rows([5, 6], np.zeros(2), np.zeros((2, 5)), np.zeros((2, 4)), tok, W, H)

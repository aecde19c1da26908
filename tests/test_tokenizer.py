"""The tokenizer finds loc/seg pieces by name, builds the PaliGemma prefix and keeps loc/seg text."""

import pytest

from paligemma.config import CheckpointError
from paligemma.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


def test_gemma_special_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (PAD_ID, EOS_ID, BOS_ID)


def test_loc_and_seg_pieces_found_by_name(tok):
    assert len(tok.loc_ids) == 1024 and len(set(tok.loc_ids)) == 1024
    assert len(tok.seg_ids) == 128
    assert tok.encode("<loc0042>") == [tok.loc_ids[42]]
    assert tok.encode("<seg127>") == [tok.seg_ids[127]]


def test_prompt_is_bos_prompt_newline(tok):
    ids = tok.encode_prompt("detect red circle")
    assert ids[0] == tok.bos_id and ids[-1] == tok.newline_id
    assert ids[1:-1] == tok.encode("detect red circle")


def test_decode_keeps_loc_seg_and_stops_at_eos(tok):
    text = "<loc0100><loc0200><loc0300><loc0400><seg001><seg127> red circle ; <loc0000><loc0000><loc1023><loc1023> é 你"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id] + tok.encode("tail")) == text


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer(tmp_path / "tokenizer.model")

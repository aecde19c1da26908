"""What the page says under an answer that is empty, partial, cut or undrawable (playground.requests.notice)."""

import pytest

import postprocess
from playground.requests import notice, timing_line

BOX = "<loc0100><loc0100><loc0500><loc0500>"


def _said(prompt, text, tokens=12, max_new_tokens=64):
    pieces = postprocess.display_labels(postprocess.parse(text, 224, 224))
    return notice(prompt, pieces, tokens, max_new_tokens, done=True)


@pytest.mark.parametrize(
    "prompt, text, expected",
    [
        ("detect blue square", "", "No blue square found."),
        ("segment red circle ; green triangle", "", "No red circle or green triangle found."),
        ("detect red circle ; green triangle", f"{BOX} red circle", "No green triangle found."),
        ("detect cat ; dog", f"{BOX} cat ; {BOX} cat", "No dog found."),
        ("detect red circle ; green triangle", f"{BOX} red circle ; {BOX} green triangle", ""),
        ("detect cat ; dog", f"{BOX} kitten", ""),  # other words than the prompt's: nothing to say it missed
        ("detect cat", f"{BOX} cat ; {BOX} cat", ""),
        ("caption en", "", "The model gave an empty answer."),
        ("caption en", "a cat", ""),
    ],
)
def test_a_finished_answer_says_what_it_did_not_find(prompt, text, expected):
    assert _said(prompt, text) == (expected, None)


def test_a_cut_answer_offers_the_next_limit_and_says_nothing_of_what_is_missing():
    said, larger = _said(
        "detect red circle ; green triangle", f"{BOX} red circle ; <loc0100>", tokens=6, max_new_tokens=6
    )
    assert said == "The answer was cut at 6 tokens before its last object was complete — run again with 64."
    assert larger == 64


def test_an_undrawable_part_is_named():
    said, _ = _said("detect red circle", "<loc0100><loc0100> red circle")
    assert said.startswith("Could not draw “red circle”")


def test_the_timing_line_says_a_rate_only_once_there_is_one():
    final = {"prefill_s": 0.1, "decode_s": 0.2, "postprocess_s": 0.01, "new_tokens": 7, "tokens_per_s": 30.0}
    assert timing_line(final) == "0.31 s · 7 tokens · 30 tok/s"
    first_token = {"prefill_s": 9.38, "decode_s": 0.0, "new_tokens": 1, "tokens_per_s": 0.0, "compiled": True}
    assert timing_line(first_token) == "9.38 s · 1 token · compiled for this prompt length first (first time only)"
    assert timing_line({"queue_s": 0.0}) == ""  # nothing generated yet

"""The demo build's round plan: which data each round trains on, whether the encoder learns, and its seed.
Training itself is not run here; the shipped model was trained with exactly these arguments."""

import shutil

import pytest

from scenes import build_demo


@pytest.fixture
def out(tmp_path, tokenizer_path):
    """An output folder that already holds the tokenizer, so the build keeps it instead of training one."""
    folder = tmp_path / "demo"
    folder.mkdir()
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return folder


def test_rounds_freeze_the_encoder_until_the_tuning_rounds(tmp_path, out, monkeypatch):
    datasets, pretrain_calls, rounds = [], [], []
    monkeypatch.setattr(build_demo, "ensure_dataset", lambda folder, *_: datasets.append(folder))
    monkeypatch.setattr(build_demo.vision_pretrain, "main", pretrain_calls.append)

    def record_round(argv):
        args = dict(zip(argv[::2], argv[1::2]))
        rounds.append((args["--data"], args["--init"], float(args["--image-encoder-lr-scale"]), args["--seed"]))
        return 0

    monkeypatch.setattr(build_demo.train, "main", record_round)
    status = build_demo.main(["--out", str(out), "--data", "first", "--final-data", "final",
                              "--work", str(tmp_path / "encoder"), "--rounds", "2", "--final-rounds", "1",
                              "--tuning-rounds", "2"])

    assert status == 0
    assert datasets == ["first", "final"]
    assert len(pretrain_calls) == 1
    scale = build_demo.ENCODER_LR_SCALE
    assert 0 < scale < 1
    assert rounds == [
        ("first", str(tmp_path / "encoder"), 0.0, "0"),
        ("first", str(out), 0.0, "1"),
        ("final", str(out), 0.0, "2"),
        ("final", str(out), scale, "3"),
        ("final", str(out), scale, "4"),
    ]


def test_a_failed_round_stops_the_build(tmp_path, out, monkeypatch):
    calls = []
    monkeypatch.setattr(build_demo, "ensure_dataset", lambda *_: None)
    monkeypatch.setattr(build_demo.vision_pretrain, "main", lambda argv: None)
    monkeypatch.setattr(build_demo.train, "main", lambda argv: calls.append(argv) or 2)

    assert build_demo.main(["--out", str(out), "--work", str(tmp_path / "encoder")]) == 2
    assert len(calls) == 1

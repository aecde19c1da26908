"""The demo build's round plan: which data each round trains on, whether the encoder learns, its rate and seed.
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


def test_rounds_freeze_the_encoder_until_the_tuning_rounds_and_polish_at_a_lower_rate(tmp_path, out, monkeypatch):
    datasets, pretrain_calls, rounds = [], [], []
    monkeypatch.setattr(build_demo, "ensure_dataset", lambda folder, *_: datasets.append(folder))
    monkeypatch.setattr(build_demo.vision_pretrain, "main", pretrain_calls.append)

    def record_round(argv):
        args = dict(zip(argv[::2], argv[1::2]))
        rounds.append((args["--data"], args["--init"], float(args["--image-encoder-lr-scale"]), float(args["--lr"]),
                       args["--seed"]))
        return 0

    monkeypatch.setattr(build_demo.train, "main", record_round)
    status = build_demo.main(["--out", str(out), "--data", "first", "--final-data", "final",
                              "--work", str(tmp_path / "encoder"), "--rounds", "2", "--final-rounds", "1",
                              "--tuning-rounds", "2", "--polish-rounds", "2", "--lr", "0.002"])

    assert status == 0
    assert datasets == ["first", "final"]
    assert len(pretrain_calls) == 1
    scale = build_demo.ENCODER_LR_SCALE
    assert 0 < scale < 1
    polish = 0.002 * build_demo.POLISH_LR_SCALE
    assert polish < 0.002
    assert polish * build_demo.POLISH_LR_SCALE < polish
    assert rounds == [
        ("first", str(tmp_path / "encoder"), 0.0, 0.002, "0"),
        ("first", str(out), 0.0, 0.002, "1"),
        ("final", str(out), 0.0, 0.002, "2"),
        ("final", str(out), scale, 0.002, "3"),
        ("final", str(out), scale, 0.002, "4"),
        ("final", str(out), scale, polish, "5"),
        ("final", str(out), scale, polish * build_demo.POLISH_LR_SCALE, "6"),
    ]


def test_a_failed_round_stops_the_build(tmp_path, out, monkeypatch):
    calls = []
    monkeypatch.setattr(build_demo, "ensure_dataset", lambda *_: None)
    monkeypatch.setattr(build_demo.vision_pretrain, "main", lambda argv: None)
    monkeypatch.setattr(build_demo.train, "main", lambda argv: calls.append(argv) or 2)

    assert build_demo.main(["--out", str(out), "--work", str(tmp_path / "encoder")]) == 2
    assert len(calls) == 1


def test_the_default_plan_is_the_shipped_models(tmp_path, out, monkeypatch):
    """Rounds 0-13 with exactly the arguments the shipped model was trained with: 5 + 4 frozen, 4 tuning at lr
    0.001, then a polish round at 0.3 of that."""
    rounds = []
    monkeypatch.setattr(build_demo, "ensure_dataset", lambda *_: None)
    monkeypatch.setattr(build_demo.vision_pretrain, "main", lambda argv: None)
    monkeypatch.setattr(build_demo.train, "main", lambda argv: rounds.append(dict(zip(argv[::2], argv[1::2]))) or 0)

    assert build_demo.main(["--out", str(out), "--work", str(tmp_path / "encoder")]) == 0
    plan = [(r["--data"], r["--image-encoder-lr-scale"], r["--lr"], r["--seed"]) for r in rounds]
    assert plan == ([("data/shapes_det", "0.0", "0.001", str(i)) for i in range(5)]
                    + [("data/shapes_det_final", "0.0", "0.001", str(i)) for i in range(5, 9)]
                    + [("data/shapes_det_final", "0.3", "0.001", str(i)) for i in range(9, 13)]
                    + [("data/shapes_det_final", "0.3", "0.0003", "13")])

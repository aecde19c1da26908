"""The demo build's round plan: which data each round trains on, whether the encoder learns, its rate and seed.
Training itself is not run here; the shipped model was trained with exactly these arguments."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from scenes import build_demo, generate


@pytest.fixture
def out(tmp_path, tokenizer_path):
    """An output folder that already holds the tokenizer, so the build keeps it instead of training one."""
    folder = tmp_path / "demo"
    folder.mkdir()
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return folder


@pytest.fixture
def build(tmp_path, out, monkeypatch):
    """Runs build_demo with datasets, encoder pretraining and rounds recorded instead of done; each round returns
    `train_status`. The result holds the status, the datasets written (folder, spec), the pretraining calls and
    each round's arguments (as a dict of options, and as given)."""

    def run(args, train_status=0):
        done = SimpleNamespace(datasets=[], pretrain_calls=[], rounds=[], argvs=[])

        def train_main(argv):
            done.argvs.append(argv)
            done.rounds.append(dict(zip(argv[::2], argv[1::2])))
            return train_status

        monkeypatch.setattr(
            build_demo, "ensure_dataset", lambda folder, _scenes, spec, _vqvae: done.datasets.append((folder, spec))
        )
        monkeypatch.setattr(build_demo.vision_pretrain, "main", done.pretrain_calls.append)
        monkeypatch.setattr(build_demo.train, "main", train_main)
        done.status = build_demo.main(["--out", str(out), "--work", str(tmp_path / "encoder"), *args])
        return done

    return run


def test_rounds_freeze_the_encoder_until_the_tuning_rounds_and_polish_at_a_lower_rate(tmp_path, out, build):
    """...and the multi-object rounds train the decoder alone, at their own rate and length."""
    done = build(
        [
            "--data",
            "first",
            "--final-data",
            "final",
            "--caption-data",
            "captions",
            "--rounds",
            "2",
            "--final-rounds",
            "1",
            "--tuning-rounds",
            "2",
            "--polish-rounds",
            "2",
            "--caption-rounds",
            "1",
            "--multi-data",
            "multi",
            "--multi-rounds",
            "1",
            "--multi-steps",
            "300",
            "--lr",
            "0.002",
        ]
    )

    assert done.status == 0
    assert done.datasets == [
        ("first", build_demo.FIRST_DATA),
        ("final", build_demo.FINAL_DATA),
        ("captions", build_demo.CAPTION_DATA),
        ("multi", build_demo.MULTI_DATA),
    ]
    assert len(done.pretrain_calls) == 1
    scale = build_demo.ENCODER_LR_SCALE
    assert 0 < scale < 1
    polish = 0.002 * build_demo.POLISH_LR_SCALE
    assert polish < 0.002
    assert polish * build_demo.POLISH_LR_SCALE < polish
    rounds = [
        (r["--data"], r["--init"], float(r["--image-encoder-lr-scale"]), float(r["--lr"]), r["--seed"])
        for r in done.rounds
    ]
    assert rounds == [
        ("first", str(tmp_path / "encoder"), 0.0, 0.002, "0"),
        ("first", str(out), 0.0, 0.002, "1"),
        ("final", str(out), 0.0, 0.002, "2"),
        ("final", str(out), scale, 0.002, "3"),
        ("final", str(out), scale, 0.002, "4"),
        ("final", str(out), scale, polish, "5"),
        ("final", str(out), scale, polish * build_demo.POLISH_LR_SCALE, "6"),
        ("captions", str(out), scale, polish, "7"),
        ("multi", str(out), 0.0, 0.002 * build_demo.MULTI_LR_SCALE, "8"),
    ]
    assert [r["--steps"] for r in done.rounds] == ["2000"] * 8 + ["300"]  # the multi-object round has its own


def test_the_later_datasets_are_written_only_when_a_round_uses_them(build):
    done = build(
        [
            "--data",
            "first",
            "--final-data",
            "final",
            "--caption-data",
            "captions",
            "--rounds",
            "1",
            "--final-rounds",
            "0",
            "--tuning-rounds",
            "0",
            "--polish-rounds",
            "0",
            "--caption-rounds",
            "0",
        ]
    )
    assert done.status == 0
    assert done.datasets == [("first", build_demo.FIRST_DATA)]
    assert [r["--data"] for r in done.rounds] == ["first"]


def test_a_multi_object_round_from_the_shipped_model_writes_only_its_own_data(tmp_path, build):
    """The further round the shipped model takes: no pretraining, no other dataset, started from --work."""
    shipped = tmp_path / "encoder"
    shipped.mkdir()
    (shipped / "model.npz").write_bytes(b"")
    zero = ["--rounds", "0", "--final-rounds", "0", "--tuning-rounds", "0", "--polish-rounds", "0"]
    done = build([*zero, "--caption-rounds", "0", "--multi-rounds", "1", "--multi-data", "multi"])
    assert done.status == 0
    assert done.datasets == [("multi", build_demo.MULTI_DATA)]
    assert done.pretrain_calls == []
    assert [(r["--data"], r["--init"], r["--steps"]) for r in done.rounds] == [("multi", str(shipped), "3600")]


def test_a_failed_round_stops_the_build(build):
    done = build([], train_status=2)
    assert done.status == 2
    assert len(done.rounds) == 1


def test_the_default_plan_is_the_shipped_models(build):
    """Rounds 0-14 with exactly the arguments the shipped model was trained with: 5 + 4 frozen, 4 tuning at lr
    0.001, then a polish round and a caption round at 0.3 of that."""
    done = build([])
    assert done.status == 0
    spec = build_demo.DatasetSpec
    assert done.datasets == [
        ("data/shapes_det", spec(2, "detect=4,segment=2", 0.8)),
        ("data/shapes_det_final", spec(4, "detect=4,segment=2", 0.93)),
        ("data/shapes_caption", spec(6, "detect=1,segment=1", 0.93)),
    ]
    plan = [(r["--data"], r["--image-encoder-lr-scale"], r["--lr"], r["--seed"]) for r in done.rounds]
    assert plan == (
        [("data/shapes_det", "0.0", "0.001", str(i)) for i in range(5)]
        + [("data/shapes_det_final", "0.0", "0.001", str(i)) for i in range(5, 9)]
        + [("data/shapes_det_final", "0.3", "0.001", str(i)) for i in range(9, 13)]
        + [("data/shapes_det_final", "0.3", "0.0003", "13")]
        + [("data/shapes_caption", "0.3", "0.0003", "14")]
    )


def test_ensure_dataset_writes_what_its_spec_says_once(tmp_path):
    folder = tmp_path / "data"
    only_boxes = build_demo.DatasetSpec(5, "caption=0,detect=1,segment=1,count=0,colour=0,yes_no=0", 1.0)
    build_demo.ensure_dataset(str(folder), 3, only_boxes, str(Path(build_demo.__file__).parents[1] / "assets/demo"))
    lines = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert sorted(line["prefix"].split()[0] for line in lines) == ["detect"] * 3 + ["segment"] * 3
    assert all(line["suffix"] for line in lines)  # positive rate 1: every prompt names a present object
    image = np.asarray(Image.open(folder / "images" / "000001.png"))
    np.testing.assert_array_equal(image, generate.scene_for(5, 1).image)
    (folder / "images" / "000000.png").unlink()
    build_demo.ensure_dataset(str(folder), 3, build_demo.FIRST_DATA, "no VQ-VAE needed: nothing is written")
    assert not (folder / "images" / "000000.png").exists()


ONE_ROUND_EACH = ["--final-rounds", "0", "--tuning-rounds", "0", "--polish-rounds", "0", "--caption-rounds", "0"]


def test_a_build_run_again_skips_the_rounds_it_finished_and_resumes_the_rest(out, build):
    first = build(["--rounds", "2", *ONE_ROUND_EACH])
    assert [r["--seed"] for r in first.rounds] == ["0", "1"]
    assert all("--resume" in argv for argv in first.argvs)  # a round in progress continues from its last save

    assert build(["--rounds", "2", *ONE_ROUND_EACH]).rounds == []
    longer = build(["--rounds", "3", *ONE_ROUND_EACH])
    assert [(r["--seed"], r["--init"]) for r in longer.rounds] == [("2", str(out))]  # from the finished rounds
    assert [r["--seed"] for r in build(["--rounds", "3", "--lr", "0.002", *ONE_ROUND_EACH]).rounds] == ["0", "1", "2"]


def test_a_failed_round_is_not_recorded_and_runs_again(build):
    failed = build(["--rounds", "2", *ONE_ROUND_EACH], train_status=2)
    assert failed.status == 2 and len(failed.rounds) == 1
    again = build(["--rounds", "2", *ONE_ROUND_EACH])
    assert [r["--seed"] for r in again.rounds] == ["0", "1"]


def test_another_batch_size_is_another_build(build):
    build(["--rounds", "1", *ONE_ROUND_EACH])
    assert len(build(["--rounds", "1", "--batch-size", "8", *ONE_ROUND_EACH]).rounds) == 1


def test_a_dataset_left_half_written_is_written_again(tmp_path):
    folder = tmp_path / "data"
    partial = tmp_path / "data.partial"
    partial.mkdir()
    (partial / "train.jsonl").write_text("{}\n")  # a build killed while writing
    spec = build_demo.DatasetSpec(5, "caption=1,detect=0,segment=0,count=0,colour=0,yes_no=0", 1.0)
    build_demo.ensure_dataset(str(folder), 2, spec, str(Path(build_demo.__file__).parents[1] / "assets/demo"))
    assert not partial.exists()
    assert [json.loads(line)["prefix"] for line in (folder / "train.jsonl").read_text().splitlines()] == [
        "caption en"
    ] * 2

"""Dense encoder pretraining: the patch targets follow the boxes, a few steps lower the loss, and the CLI
writes a checkpoint that paligemma.load reads with the trained encoder in it. Also the from-scratch geometry
its starting weights have (scenes.from_scratch)."""

import json

import numpy as np
import pytest

import paligemma
from paligemma import train
from paligemma.config import CONFIGS
from paligemma.params import init_params
from paligemma.tokenizer import Tokenizer
from scenes import from_scratch, vision_pretrain
from scenes.generate import compose_scene


def test_patches_take_the_label_and_box_of_the_object_over_their_centre():
    scene = compose_scene(
        [("circle", "red", (0, 0, 60, 60)), ("triangle", "blue", (140, 100, 220, 190))], np.random.default_rng(0)
    )
    classes, boxes = vision_pretrain.patch_targets(scene, grid=8)  # 28 px patches, centres at 14, 42, 70, ...
    classes, boxes = classes.reshape(8, 8), boxes.reshape(8, 8, 4)
    red, blue = 1 + vision_pretrain.LABELS.index("red circle"), 1 + vision_pretrain.LABELS.index("blue triangle")
    assert (classes[:2, :2] == red).all() and (classes[4:7, 5:8] == blue).all()
    assert (classes == red).sum() == 4 and (classes == blue).sum() == 9 and (classes == 0).sum() == 64 - 13
    np.testing.assert_array_equal(boxes[0, 1], [0, 0, 274, 274])  # location bins: round(px / 224 * 1024)
    np.testing.assert_array_equal(boxes[6, 5], [457, 640, 869, 1006])  # y1 x1 y2 x2
    assert not boxes[classes == 0].any()


@pytest.mark.slow
def test_a_few_steps_lower_the_loss(tokenizer_path):
    cfg = CONFIGS["tiny"](Tokenizer(tokenizer_path).vocab_size)
    data = vision_pretrain.make_scenes(5, 32, 2, cfg.vision.image_size)
    assert data["images"].shape == (32, 56, 56, 3) and data["classes"].shape == (32, 4)
    img = init_params(cfg)["img"]
    _, before = vision_pretrain.pretrain(cfg.vision, img, data, data, 0, 8, 3e-3, 0)
    _, after = vision_pretrain.pretrain(cfg.vision, init_params(cfg)["img"], data, data, 60, 8, 3e-3, 0)
    assert after["loss"] < 0.7 * before["loss"], (before, after)


@pytest.mark.slow
def test_the_cli_writes_a_loadable_checkpoint_with_the_trained_encoder(tmp_path, tokenizer_path, capsys):
    out = tmp_path / "pretrained"
    assert (
        vision_pretrain.main(
            [
                "--out",
                str(out),
                "--tokenizer",
                tokenizer_path,
                "--config",
                "tiny",
                "--scenes",
                "16",
                "--steps",
                "3",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"loss", "class_accuracy_on_objects", "box_error_px"} <= set(figures)
    model = paligemma.load(str(out))
    fresh = init_params(model.config)["img"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    trained = model.params["img"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert model.config == CONFIGS["tiny"](model.tokenizer.vocab_size)
    assert not np.allclose(np.asarray(trained), np.asarray(fresh))


def test_structured_init_makes_nearby_bins_alike(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    cfg = CONFIGS["tiny"](tokenizer.vocab_size)
    params = from_scratch.structured_init(init_params(cfg, 0), cfg, tokenizer)
    rows = np.asarray(params["llm"]["embedder"]["input_embedding"])[tokenizer.loc_ids]
    similarity = rows @ rows[500] / np.linalg.norm(rows, axis=1) / np.linalg.norm(rows[500])
    assert similarity[501] > 0.9 and similarity[500 + 200] < 0.5
    pos = np.asarray(params["img"]["pos_embedding"])[0]
    assert np.linalg.norm(pos[0] - pos[1]) < np.linalg.norm(pos[0] - pos[-1])


def test_the_from_scratch_cli_is_the_training_cli_starting_from_the_geometry(monkeypatch, capsys):
    """paligemma.train knows nothing of scenes: scenes.from_scratch hands it the starting weights."""
    calls = []
    monkeypatch.setattr(
        train, "train", lambda args, fresh: calls.append((args, fresh)) or {"losses": [(1, 0.5)], "seconds": 1.0}
    )
    assert from_scratch.main(["--data", "d", "--out", "o", "--config", "tiny", "--tokenizer", "t.model"]) == 0
    ((args, fresh),) = calls
    assert fresh is from_scratch.fresh_params and (args.data, args.config) == ("d", "tiny")
    assert json.loads(capsys.readouterr().out)["final_loss"] == 0.5

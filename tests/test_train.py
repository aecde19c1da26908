"""The training loop learns, and what it saves reloads to the same outputs."""

import json

import numpy as np
import pytest
from PIL import Image

import paligemma
from paligemma import train
from paligemma.config import tiny_config


def _write_dataset(folder, n=8):
    (folder / "images").mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n):
            colour = ["red", "blue"][i % 2]
            image = np.full((56, 56, 3), 230, np.uint8)
            image[10:40, 12:44] = (220, 40, 40) if colour == "red" else (40, 80, 220)
            image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / "images" / f"{i}.png")
            f.write(
                json.dumps(
                    {"image": f"images/{i}.png", "prefix": "answer en what color is the square?", "suffix": colour}
                )
                + "\n"
            )
    (folder / "valid.jsonl").write_text((folder / "train.jsonl").read_text())


@pytest.mark.slow
def test_few_steps_lower_the_loss_and_checkpoint_reloads(tmp_path, tokenizer_path):
    _write_dataset(tmp_path)
    out = tmp_path / "out"
    args = train._parser().parse_args(
        [
            "--data",
            str(tmp_path),
            "--out",
            str(out),
            "--config",
            "tiny",
            "--tokenizer",
            tokenizer_path,
            "--steps",
            "30",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--eval-every",
            "30",
            "--seed",
            "1",
        ]
    )
    summary = train.train(args)
    losses = [loss for _, loss in summary["losses"]]
    assert losses[-1] < 0.5 * losses[0], losses

    model = paligemma.load(str(out))
    image = Image.open(tmp_path / "images" / "0.png")
    first = model.generate(image, "answer en what color is the square?", max_new_tokens=8)
    again = paligemma.load(str(out / "model.npz")).generate(
        image, "answer en what color is the square?", max_new_tokens=8
    )
    assert first == again


@pytest.mark.slow
def test_frozen_image_encoder_stays_unchanged(tmp_path, tokenizer_path):
    from paligemma.params import init_params

    cfg = tiny_config(2000)
    params = init_params(cfg, 0)
    optimizer = train.make_optimizer(params, 1e-2, 10, image_encoder_lr_scale=0.0)
    step = train.make_train_step(cfg, optimizer)
    before = jax_copy(params)
    batch = two_example_batch(np.zeros((2, 56, 56, 3), np.float32))
    opt_state = optimizer.init(params)
    for _ in range(3):  # the warm-up starts at a learning rate of 0
        params, opt_state, _ = step(params, opt_state, batch)
    np.testing.assert_array_equal(params["img"]["head"]["kernel"], before["img"]["head"]["kernel"])
    assert not np.array_equal(params["llm"]["final_norm"]["scale"], before["llm"]["final_norm"]["scale"])


@pytest.mark.slow
def test_image_encoder_lr_scale_scales_only_encoder_updates():
    """Adam's first real step moves each weight by about the learning rate, so a quarter of the rate gives a
    quarter of the encoder's step while the decoder's step is the one it gets at full rate."""
    from paligemma.params import init_params

    cfg = tiny_config(2000)
    batch = two_example_batch(np.linspace(0, 1, 2 * 56 * 56 * 3, dtype=np.float32).reshape(2, 56, 56, 3))

    def deltas(scale):
        params = init_params(cfg, 0)
        before = jax_copy(params)
        optimizer = train.make_optimizer(params, 1e-2, 10, image_encoder_lr_scale=scale)
        step, state = train.make_train_step(cfg, optimizer), optimizer.init(params)
        for _ in range(2):  # the warm-up starts at a learning rate of 0
            params, state, _ = step(params, state, batch)
        return (
            params["img"]["head"]["kernel"] - before["img"]["head"]["kernel"],
            params["llm"]["final_norm"]["scale"] - before["llm"]["final_norm"]["scale"],
        )

    (img_full, llm_full), (img_quarter, llm_quarter) = deltas(1.0), deltas(0.25)
    assert np.abs(img_full).max() > 0
    np.testing.assert_allclose(img_quarter, 0.25 * img_full, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(llm_quarter, llm_full, rtol=1e-5, atol=1e-9)


def test_negative_image_encoder_lr_scale_is_refused(tmp_path, tokenizer_path, capsys):
    status = train.main(
        [
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--config",
            "tiny",
            "--tokenizer",
            tokenizer_path,
            "--image-encoder-lr-scale",
            "-1",
        ]
    )
    assert status == 2
    assert "--image-encoder-lr-scale must be 0 or more" in capsys.readouterr().err


def two_example_batch(images):
    """A hand-made training batch for the tiny config: two 56 px images, a 2-token prefix and a 2-token suffix."""
    return {
        "images": images,
        "tokens": np.array([[2, 5, 6, 7], [2, 5, 8, 9]], np.int32),
        "prefix_len": np.array([2, 2], np.int32),
        "seq_len": np.array([4, 4], np.int32),
    }


def jax_copy(tree):
    import jax

    return jax.tree.map(np.array, tree)


def test_soft_loc_targets_reward_near_misses(monkeypatch):
    """With loc_sigma, a box edge predicted 2 bins off costs less than one 300 bins off; plain CE can't tell."""
    vocab, first = 1100, 40
    target = first + 500
    batch = {
        "tokens": np.array([[2, 7, target, 1]], np.int32),
        "prefix_len": np.array([2], np.int32),
        "seq_len": np.array([4], np.int32),
        "images": None,
    }

    def forward_predicting(bin_):
        logits = np.zeros((1, 4, vocab), np.float32)
        logits[0, 1, first + bin_] = 8.0  # position 1 predicts the loc token
        logits[0, 2, 1] = 8.0  # position 2 predicts EOS
        return lambda *args, **kwargs: logits

    losses = {}
    for loc in (None, train.LocTargets(first, sigma=3.0)):
        for bin_ in (502, 800):
            monkeypatch.setattr(train, "forward", forward_predicting(bin_))
            losses[loc is not None, bin_] = float(train.suffix_loss(None, None, batch, loc))
    assert abs(losses[False, 502] - losses[False, 800]) < 1e-5
    assert losses[True, 502] < losses[True, 800] - 0.2


def test_object_tokens_give_each_loc_and_seg_token_its_box(tokenizer_path):
    from paligemma.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    segs = "".join(f"<seg{i:03d}>" for i in range(16))
    suffix = tokenizer.encode(
        f"<loc0010><loc0020><loc0300><loc0400>{segs} red circle ; <loc0500><loc0600><loc0900><loc1000> red square"
    )
    found = train.object_tokens(suffix, tokenizer)
    first, second = (10, 20, 300, 400), (500, 600, 900, 1000)
    assert [box for _, box in found] == [first] * 20 + [second] * 4
    assert all(suffix[i] in tokenizer.loc_ids + tokenizer.seg_ids for i, _ in found)
    assert found[20][0] > found[19][0] + 1  # the label and " ; " between the objects have no box
    assert train.object_tokens(tokenizer.encode("a red circle"), tokenizer) == []


def test_patches_inside_a_box_and_the_fallback_for_thin_boxes():
    grid = 4  # patch centres at 128, 384, 640, 896 bins
    inside = train.patches_inside((0, 300, 500, 1023), grid).reshape(grid, grid)
    np.testing.assert_array_equal(inside, [[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    thin = train.patches_inside((700, 10, 720, 60), grid).reshape(grid, grid)
    assert thin.sum() == 1 and thin[2, 0] == 1


def test_batches_put_grounding_targets_before_each_object_token(tmp_path, tokenizer_path):
    from paligemma.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    cfg = tiny_config(tokenizer.vocab_size)  # 56 px, 28 px patches: a 2×2 grid
    Image.new("RGB", (56, 56), "white").save(tmp_path / "a.png")
    examples = [
        train.Example("a.png", "detect circle", "<loc0000><loc0000><loc0400><loc1000> circle"),
        train.Example("a.png", "caption en", "a red circle"),
    ]
    batches = train.Batches(str(tmp_path), examples, tokenizer, cfg)
    assert "grounding" not in batches.batch([0, 1])  # only built when the loss asks for it
    batch = batches.batch([0, 1], with_grounding=True)
    start = len(tokenizer.encode_prompt("detect circle")) - 1  # the position that writes y1
    rows = batch["grounding"][0].sum(-1)
    assert rows[start : start + 4].tolist() == [2, 2, 2, 2] and rows.sum() == 8  # the top two patches
    np.testing.assert_array_equal(batch["grounding"][0, start], [1, 1, 0, 0])
    assert not batch["grounding"][1].any()


def test_grounding_loss_rewards_looking_at_the_target():
    targets = np.zeros((1, 3, 4), np.float32)
    targets[0, 1] = [0, 0, 1, 1]  # position 1 should look at patches 2 and 3
    looking = np.zeros((3, 1, 2, 3, 6), np.float32)  # [L, B, N, T, S]: 4 image tokens + 2 text tokens
    looking[..., 4] = 1.0  # everyone looks at a text token ...
    looking[1:, 0, 0, 1] = [0, 0, 0.5, 0.5, 0, 0]  # ... except head 0 of later layers at position 1
    away = np.zeros_like(looking)
    away[..., 0] = 1.0
    assert float(train.grounding_loss(looking, targets, 4)) < 1e-3
    assert float(train.grounding_loss(away, targets, 4)) > 10


def test_forward_returns_attention_that_leaves_logits_unchanged():
    import jax

    from paligemma.model import forward
    from paligemma.params import init_params

    cfg = tiny_config(300)
    params = init_params(cfg, 0)
    args = (
        np.zeros((2, 56, 56, 3), np.float32),
        np.array([[2, 5, 6, 7], [2, 5, 8, 0]], np.int32),
        np.array([2, 2], np.int32),
        np.array([4, 3], np.int32),
    )
    plain = forward(params, cfg, *args)
    logits, attention = jax.jit(forward, static_argnums=(1, 6))(params, cfg, *args, True)
    np.testing.assert_allclose(logits, plain, atol=1e-5)
    assert attention.shape == (cfg.text.depth, 2, cfg.text.num_heads, 4, cfg.num_image_tokens + 4)
    np.testing.assert_allclose(np.asarray(attention).sum(-1), 1.0, atol=1e-5)
    assert not np.asarray(attention)[:, 1, :, :, -1].any()  # the second row's padding is never looked at


@pytest.mark.slow
def test_grounding_steps_move_attention_to_the_object(tmp_path, tokenizer_path):
    """A few steps with --grounding raise head 0's attention on the object's patches; without, it stays."""
    from paligemma.model import forward
    from paligemma.params import init_params
    from paligemma.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    cfg = tiny_config(tokenizer.vocab_size)
    image = np.full((56, 56, 3), 230, np.uint8)
    image[:28, :28] = (220, 40, 40)
    Image.fromarray(image).save(tmp_path / "a.png")
    examples = [train.Example("a.png", "detect red square", "<loc0000><loc0000><loc0512><loc0512> red square")]
    batch = train.Batches(str(tmp_path), examples * 4, tokenizer, cfg).batch(range(4), with_grounding=True)
    start = len(tokenizer.encode_prompt("detect red square")) - 1

    def attention_on_object(weight):
        params = init_params(cfg, 0)
        optimizer = train.make_optimizer(params, 1e-2, 40)
        step, state = train.make_train_step(cfg, optimizer, grounding=weight), optimizer.init(params)
        for _ in range(40):
            params, state, _ = step(params, state, batch)
        _, attention = forward(
            params, cfg, batch["images"], batch["tokens"], batch["prefix_len"], batch["seq_len"], with_attention=True
        )
        return float(attention[1, 0, 0, start, 0])  # the top-left patch holds the square

    assert attention_on_object(1.0) > 0.8 > attention_on_object(0.0)


def test_the_model_package_never_imports_scenes():
    """Training is general: the demo model's presets live in paligemma.config, its geometry in scenes/."""
    import re
    from pathlib import Path

    sources = {path.name: path.read_text() for path in Path(paligemma.__file__).parent.glob("*.py")}
    assert "train.py" in sources
    assert [name for name, text in sources.items() if re.search(r"^\s*(from|import) scenes\b", text, re.M)] == []
    assert not hasattr(train, "structured_init") and not hasattr(train, "demo_config")


class _Stopped(Exception):
    """Stands for the process being killed mid-run."""


def _stop_after(calls: int, make_train_step):
    def make(*args, **kwargs):
        step, count = make_train_step(*args, **kwargs), [0]

        def stopping(*step_args):
            if count[0] == calls:
                raise _Stopped
            count[0] += 1
            return step(*step_args)

        return stopping

    return make


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, tokenizer_path, monkeypatch, capsys):
    """Across an epoch boundary (8 examples, batches of 4) and the warm-up, killed after step 5 of 6 with saves every
    2 steps: the rerun continues after step 4 with the same batches and optimiser state."""
    data = tmp_path / "data"
    data.mkdir()
    _write_dataset(data)

    def run(out, seed="1"):
        options = ["--data", str(data), "--out", str(out), "--config", "tiny", "--tokenizer", tokenizer_path]
        options += ["--steps", "6", "--batch-size", "4", "--save-every", "2", "--eval-every", "100"]
        return train.train(train._parser().parse_args([*options, "--lr", "3e-3", "--seed", seed, "--resume"]))

    run(tmp_path / "whole")
    with monkeypatch.context() as patch:
        patch.setattr(train, "make_train_step", _stop_after(5, train.make_train_step))
        with pytest.raises(_Stopped):
            run(tmp_path / "stopped")
    assert (tmp_path / "stopped" / train.TRAIN_STATE).is_file()
    (tmp_path / "stopped" / "model.npz.partial").write_bytes(b"PK")  # as a kill in the middle of a save leaves it
    paligemma.load(str(tmp_path / "stopped"))  # mid-run the folder still loads (the build's next --init)
    capsys.readouterr()
    summary = run(tmp_path / "stopped")
    assert "resuming after step 4 of 6" in capsys.readouterr().err
    assert [step for step, _ in summary["losses"]] == [6]
    assert not (tmp_path / "stopped" / train.TRAIN_STATE).exists()  # finished: nothing left to resume

    whole, resumed = (np.load(tmp_path / name / "model.npz") for name in ("whole", "stopped"))
    assert sorted(whole) == sorted(resumed)
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key], err_msg=key)


@pytest.mark.slow
def test_a_state_saved_by_another_run_is_not_resumed(tmp_path, tokenizer_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _write_dataset(data)
    out = tmp_path / "out"
    options = ["--data", str(data), "--out", str(out), "--config", "tiny", "--tokenizer", tokenizer_path]
    options += ["--steps", "4", "--batch-size", "4", "--save-every", "2", "--eval-every", "100", "--resume"]
    with monkeypatch.context() as patch:
        patch.setattr(train, "make_train_step", _stop_after(3, train.make_train_step))
        with pytest.raises(_Stopped):
            train.train(train._parser().parse_args([*options, "--seed", "1"]))
    capsys.readouterr()
    train.train(train._parser().parse_args([*options, "--seed", "2"]))
    assert "saved by another run" in capsys.readouterr().err
    assert "resuming" not in capsys.readouterr().err
    assert not (out / train.TRAIN_STATE).exists()

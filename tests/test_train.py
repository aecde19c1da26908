"""The training loop learns, and what it saves reloads to the same outputs."""

import json

import numpy as np
from PIL import Image

import paligemma
from paligemma import train


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
            f.write(json.dumps({"image": f"images/{i}.png", "prefix": "answer en what color is the square?",
                                "suffix": colour}) + "\n")
    (folder / "valid.jsonl").write_text((folder / "train.jsonl").read_text())


def test_few_steps_lower_the_loss_and_checkpoint_reloads(tmp_path, tokenizer_path):
    _write_dataset(tmp_path)
    out = tmp_path / "out"
    args = train._parser().parse_args([
        "--data", str(tmp_path), "--out", str(out), "--config", "tiny", "--tokenizer", tokenizer_path,
        "--steps", "30", "--batch-size", "8", "--lr", "3e-3", "--eval-every", "30", "--seed", "1"])
    summary = train.train(args)
    losses = [loss for _, loss in summary["losses"]]
    assert losses[-1] < 0.5 * losses[0], losses

    model = paligemma.load(str(out))
    image = Image.open(tmp_path / "images" / "0.png")
    first = model.generate(image, "answer en what color is the square?", max_new_tokens=8)
    again = paligemma.load(str(out / "model.npz")).generate(image, "answer en what color is the square?", max_new_tokens=8)
    assert first == again


def test_frozen_image_encoder_stays_unchanged(tmp_path, tokenizer_path):
    from paligemma.params import init_params

    cfg = train.tiny_config(2000)
    params = init_params(cfg, 0)
    optimizer = train.make_optimizer(params, 1e-2, 10, freeze_image_encoder=True)
    step = train.make_train_step(cfg, optimizer)
    before = jax_copy(params)
    batch = {"images": np.zeros((2, 56, 56, 3), np.float32), "tokens": np.array([[2, 5, 6, 7], [2, 5, 8, 9]], np.int32),
             "prefix_len": np.array([2, 2], np.int32), "seq_len": np.array([4, 4], np.int32)}
    opt_state = optimizer.init(params)
    for _ in range(3):  # the warm-up starts at a learning rate of 0
        params, opt_state, _ = step(params, opt_state, batch)
    np.testing.assert_array_equal(params["img"]["head"]["kernel"], before["img"]["head"]["kernel"])
    assert not np.array_equal(params["llm"]["final_norm"]["scale"], before["llm"]["final_norm"]["scale"])


def jax_copy(tree):
    import jax

    return jax.tree.map(np.array, tree)


def test_soft_loc_targets_reward_near_misses(monkeypatch):
    """With loc_sigma, a box edge predicted 2 bins off costs less than one 300 bins off; plain CE can't tell."""
    vocab, first = 1100, 40
    target = first + 500
    batch = {"tokens": np.array([[2, 7, target, 1]], np.int32), "prefix_len": np.array([2], np.int32),
             "seq_len": np.array([4], np.int32), "images": None}

    def forward_predicting(bin_):
        logits = np.zeros((1, 4, vocab), np.float32)
        logits[0, 1, first + bin_] = 8.0  # position 1 predicts the loc token
        logits[0, 2, 1] = 8.0  # position 2 predicts EOS
        return lambda *args: logits

    losses = {}
    for loc in (None, train.LocTargets(first, sigma=3.0)):
        for bin_ in (502, 800):
            monkeypatch.setattr(train, "forward", forward_predicting(bin_))
            losses[loc is not None, bin_] = float(train.suffix_loss(None, None, batch, loc))
    assert abs(losses[False, 502] - losses[False, 800]) < 1e-5
    assert losses[True, 502] < losses[True, 800] - 0.2


def test_structured_init_makes_nearby_bins_alike(tokenizer_path):
    from paligemma.params import init_params
    from paligemma.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    cfg = train.tiny_config(tokenizer.vocab_size)
    params = train.structured_init(init_params(cfg, 0), cfg, tokenizer)
    rows = np.asarray(params["llm"]["embedder"]["input_embedding"])[tokenizer.loc_ids]
    similarity = rows @ rows[500] / np.linalg.norm(rows, axis=1) / np.linalg.norm(rows[500])
    assert similarity[501] > 0.9 and similarity[500 + 200] < 0.5
    pos = np.asarray(params["img"]["pos_embedding"])[0]
    assert np.linalg.norm(pos[0] - pos[1]) < np.linalg.norm(pos[0] - pos[-1])

"""`python -m paligemma predict`: JSON on success, a one-line message and exit code 2 on bad input."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import paligemma
from paligemma.__main__ import main


def _image_file(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def _predict(model, image, prompt, *options) -> int:
    """`python -m paligemma predict` on `model`, `image` and `prompt` with more options: its exit code."""
    return main(["predict", "--model", str(model), "--image", str(image), "--prompt", prompt, *options])


def test_predict_json(tmp_path, tiny_model_dir, capsys):
    code = _predict(tiny_model_dir, _image_file(tmp_path), "detect red circle", "--max-new-tokens", "8", "--json")
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["text"], str) and isinstance(out["objects"], list)
    assert out["timing"]["new_tokens"] >= 1 and out["timing"]["load_s"] > 0


def test_predict_reports_masks_with_a_vqvae(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """With a vae-oid.npz beside the model, seg tokens become masks in the JSON."""
    import jax

    import postprocess
    from paligemma import Model

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    decoder = postprocess.params_to_published(postprocess.init_decoder_params(jax.random.key(0)))
    np.savez(folder / "vae-oid.npz", **decoder)
    segment = "<loc0100><loc0100><loc0800><loc0900>" + "".join(f"<seg{i:03d}>" for i in range(16)) + " red circle"
    monkeypatch.setattr(Model, "run", lambda self, *a, **k: iter([_fake_result(segment, self.tokenizer)]))
    assert _predict(folder, _image_file(tmp_path), "segment red circle", "--json") == 0
    objects = json.loads(capsys.readouterr().out)["objects"]
    assert [o["label"] for o in objects] == ["red circle"] and objects[0]["mask"] is True
    assert objects[0]["score"] == 1.0 and objects[0]["confidence"]["mask_score"] == 1.0  # every token was sure
    assert [edge["bin"] for edge in objects[0]["confidence"]["edges"]] == [100, 100, 800, 900]


def _fake_result(text, tokenizer):
    """The Result of a run that wrote `text`, every token with probability 1 (log-probability 0)."""
    from paligemma import Result, Timing, TokenScores

    ids = tokenizer.encode(text)
    zeros = np.zeros((len(ids), 5), np.float32)
    scores = TokenScores(ids, zeros[:, 0], np.repeat(np.array(ids)[:, None], 5, axis=1), zeros)
    return Result([text], [ids], Timing(new_tokens=len(ids)), [scores])


def test_int8_weights_load_and_predict(tmp_path, tiny_model_dir, capsys):
    options = ["--max-new-tokens", "8", "--dtype", "int8", "--json"]
    assert _predict(tiny_model_dir, _image_file(tmp_path), "detect x", *options) == 0
    assert json.loads(capsys.readouterr().out)["timing"]["new_tokens"] >= 1
    assert paligemma.load(str(tiny_model_dir), dtype="int8").info()["dtype"] == "int8"


def test_bad_image_is_a_message_not_a_traceback(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert _predict(tiny_model_dir, bad, "caption en") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not read an image") and "Traceback" not in err


def test_missing_model_is_a_message(tmp_path, capsys):
    assert _predict(tmp_path / "none", _image_file(tmp_path), "x") == 2
    assert "neither an existing file" in capsys.readouterr().err


def test_bad_sampler_is_a_message(tmp_path, tiny_model_dir, capsys):
    assert _predict(tiny_model_dir, _image_file(tmp_path), "x", "--sampler", "beam(0)") == 2
    assert "accepted" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, message",
    [
        (["--seed", "18446744073709551616"], "seed must be a whole number from 0 to 9223372036854775807"),
        (["--seed", "-1"], "seed must be a whole number from 0 to"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer from 1 to 1024"),
        (["--max-new-tokens", "100000"], "max_new_tokens must be an integer from 1 to 1024"),
        (["--dtype", "float64"], "unknown dtype 'float64'; accepted: float32, bfloat16, float16"),
    ],
)
def test_bad_options_are_a_message_not_a_traceback(tmp_path, tiny_model_dir, capsys, option, message):
    assert _predict(tiny_model_dir, _image_file(tmp_path), "caption en", *option) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and "Traceback" not in err


def test_the_largest_seed_samples(tiny_model):
    image = np.zeros((20, 20, 3), np.uint8)
    text = tiny_model.generate(image, "caption en", max_new_tokens=2, sampler="temperature(1)", seed=paligemma.MAX_SEED)
    assert isinstance(text, str)

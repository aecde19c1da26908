"""`python -m paligemma predict`: JSON on success, a one-line message and exit code 2 on bad input."""

import json
import shutil

import numpy as np
from PIL import Image

from paligemma.__main__ import main


def _image_file(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def test_predict_json(tmp_path, tiny_model_dir, capsys):
    code = main(["predict", "--model", str(tiny_model_dir), "--image", _image_file(tmp_path),
                 "--prompt", "detect red circle", "--max-new-tokens", "8", "--json"])
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
    np.savez(folder / "vae-oid.npz", **postprocess.params_to_published(postprocess.init_decoder_params(jax.random.key(0))))
    segment = "<loc0100><loc0100><loc0800><loc0900>" + "".join(f"<seg{i:03d}>" for i in range(16)) + " red circle"
    monkeypatch.setattr(Model, "run", lambda self, *a, **k: iter([_fake_result(segment)]))
    assert main(["predict", "--model", str(folder), "--image", _image_file(tmp_path), "--prompt", "segment red circle",
                 "--json"]) == 0
    objects = json.loads(capsys.readouterr().out)["objects"]
    assert [o["label"] for o in objects] == ["red circle"] and objects[0]["mask"] is True


def _fake_result(text):
    from paligemma import Result
    from paligemma.generate import Timing

    return Result([text], [[]], Timing(new_tokens=1))


def test_bad_image_is_a_message_not_a_traceback(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["predict", "--model", str(tiny_model_dir), "--image", str(bad), "--prompt", "caption en"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not read an image") and "Traceback" not in err


def test_missing_model_is_a_message(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "none"), "--image", _image_file(tmp_path), "--prompt", "x"]) == 2
    assert "neither an existing file" in capsys.readouterr().err


def test_bad_sampler_is_a_message(tmp_path, tiny_model_dir, capsys):
    assert main(["predict", "--model", str(tiny_model_dir), "--image", _image_file(tmp_path), "--prompt", "x",
                 "--sampler", "beam(3)"]) == 2
    assert "accepted" in capsys.readouterr().err

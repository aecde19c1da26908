"""Checkpoints that are missing, malformed or of no PaliGemma layout fail with a message naming the problem."""

import shutil

import numpy as np
import pytest

import paligemma
from paligemma import checkpoint
from paligemma.config import CheckpointError


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing file"):
        paligemma.load(str(tmp_path / "nope.npz"))


def test_not_a_zip(tmp_path, tokenizer_path):
    (tmp_path / "model.npz").write_bytes(b"hello, not a checkpoint")
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    with pytest.raises(CheckpointError, match="model.npz"):
        paligemma.load(str(tmp_path / "model.npz"))


def test_truncated_npz(tmp_path, tiny_model_dir, tokenizer_path):
    data = (tiny_model_dir / "model.npz").read_bytes()
    (tmp_path / "model.npz").write_bytes(data[: len(data) * 2 // 3])
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    with pytest.raises(CheckpointError, match="model.npz"):
        paligemma.load(str(tmp_path))


def test_pickled_npz_is_refused(tmp_path, tiny_model_dir, tokenizer_path):
    """allow_pickle=False: an object array (which would run pickle) is an error, never loaded."""
    arrays = dict(np.load(tiny_model_dir / "model.npz"))
    arrays["llm/final_norm/scale"] = np.array([{"evil": 1}], dtype=object)
    np.savez(tmp_path / "model.npz", **arrays)
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    with pytest.raises(CheckpointError):
        paligemma.load(str(tmp_path))


def test_missing_tensor_is_named(tmp_path, tiny_model_dir, tokenizer_path):
    arrays = dict(np.load(tiny_model_dir / "model.npz"))
    del arrays["llm/layers/mlp/linear"]
    np.savez(tmp_path / "model.npz", **arrays)
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    with pytest.raises(CheckpointError, match="llm/layers/mlp/linear"):
        paligemma.load(str(tmp_path))


@pytest.mark.parametrize(
    "key,shape,match",
    [
        ("img/pos_embedding", (1, 5, 32), "pos_embedding"),  # 5 patches: not a square grid
        ("llm/layers/attn/q_einsum/w", (2, 3, 64, 16), "heads"),  # 3 heads over 2 kv heads
        ("llm/layers/mlp/linear", (2, 95, 64), "mlp/linear"),  # does not match the gating width
    ],
)
def test_shapes_of_no_known_variant(tmp_path, tiny_model_dir, tokenizer_path, key, shape, match):
    arrays = dict(np.load(tiny_model_dir / "model.npz"))
    arrays[key] = np.zeros(shape, np.float32)
    np.savez(tmp_path / "model.npz", **arrays)
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    with pytest.raises(CheckpointError, match=match):
        paligemma.load(str(tmp_path))


def test_params_prefix_and_dtypes(tmp_path, tiny_model_dir, tokenizer_path):
    """Keys under 'params/' and bf16/f16 storage load, cast to the dtype asked for."""
    import ml_dtypes

    arrays = dict(np.load(tiny_model_dir / "model.npz"))
    reference = paligemma.load(str(tiny_model_dir))
    for storage in (ml_dtypes.bfloat16, np.float16):
        np.savez(tmp_path / "model.npz", **{f"params/{k}": v.astype(storage) for k, v in arrays.items()})
        shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
        model = paligemma.load(str(tmp_path), dtype="float32")
        assert model.dtype == np.float32
        got = np.asarray(model.params["llm"]["layers"]["mlp"]["linear"])
        np.testing.assert_allclose(got, arrays["llm/layers/mlp/linear"], atol=2e-3, rtol=1e-2)
    assert paligemma.load(str(tmp_path), dtype="bfloat16").dtype == ml_dtypes.bfloat16
    assert reference.config == model.config


def test_folder_without_tokenizer(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "model.npz", tmp_path / "model.npz")
    with pytest.raises(CheckpointError, match="tokenizer"):
        paligemma.load(str(tmp_path))


def test_tokenizer_that_is_not_sentencepiece(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "model.npz", tmp_path / "model.npz")
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="SentencePiece"):
        paligemma.load(str(tmp_path))


def test_unknown_dtype(tiny_model_dir):
    with pytest.raises(ValueError, match="float32"):
        paligemma.load(str(tiny_model_dir), dtype="int4")


def test_hf_folder_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(CheckpointError, match="model-00001-of-00002"):
        checkpoint.read_checkpoint(str(tmp_path))


def test_hf_folder_corrupt_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint.read_checkpoint(str(tmp_path))


def test_hub_repo_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="google/paligemma2-3b-mix-224"):
        paligemma.load("google/paligemma2-3b-mix-224")


def test_sharded_hf_folder_loads(tmp_path, tokenizer_path):
    """A folder split into shards with an index loads like the single file."""
    from hf_models import build_hf_model, save_hf_folder

    from paligemma.tokenizer import Tokenizer

    hf = build_hf_model(2, 28, Tokenizer(tokenizer_path).vocab_size)
    single = save_hf_folder(hf, str(tmp_path / "single"), tokenizer_path)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    shutil.copy(tokenizer_path, tmp_path / "sharded" / "tokenizer.model")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    a, _ = checkpoint.load_params(single)
    b, _ = checkpoint.load_params(str(tmp_path / "sharded"))
    np.testing.assert_array_equal(a["llm"]["layers"]["mlp"]["linear"], b["llm"]["layers"]["mlp"]["linear"])

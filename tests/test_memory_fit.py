"""Fit before fetch: byte estimates against the published sizes, and the refusal message.

Published sizes: the Hub repos store each parameter once in safetensors (google/paligemma2-* in bfloat16,
google/paligemma-3b-* main revision in float32), so their weight bytes are parameter count × dtype bytes plus
a header of a few KB per shard. Parameter counts as published in keras-team/keras-hub
keras_hub/src/models/pali_gemma/pali_gemma_presets.py ("params" metadata): pali_gemma2_pt_3b_224 3,032,094,960;
pali_gemma2_pt_10b_224 9,662,409,456; pali_gemma2_pt_28b_224 27,650,192,112; pali_gemma_3b_224 2,923,335,408
(its 257,152-row embedding; the Hub files carry 257,216 rows).
"""

import json

import pytest
from test_published_configs import paligemma1, paligemma2

from paligemma import memory_fit, published

PUBLISHED_BYTES = {  # repo -> (config.json field set, published safetensors weight bytes)
    "google/paligemma2-3b-pt-224": (paligemma2("3b", 224), 3_032_094_960 * 2),
    "google/paligemma2-10b-pt-224": (paligemma2("10b", 224), 9_662_409_456 * 2),
    "google/paligemma2-28b-pt-224": (paligemma2("28b", 224), 27_650_192_112 * 2),
    "google/paligemma-3b-pt-224": (paligemma1(224), 2_923_335_408 * 4),
}


@pytest.mark.parametrize("repo", PUBLISHED_BYTES)
def test_weight_estimates_are_within_two_percent_of_the_published_sizes(repo):
    hf_config, size = PUBLISHED_BYTES[repo]
    dtype = "float32" if hf_config["torch_dtype"] == "float32" else "bfloat16"
    estimate = memory_fit.weight_bytes(published.architecture(hf_config), dtype)
    print(f"{repo}: estimate {estimate / 1e9:.3f} GB, published {size / 1e9:.3f} GB")
    assert abs(estimate - size) / size < 0.02


def test_kv_cache_follows_layers_heads_and_tokens():
    cfg = published.architecture(paligemma2("3b", 224))
    # 2 (k, v) × 26 layers × 4 kv heads × 256 head dim × 2 bytes per token and row
    assert memory_fit.kv_cache_bytes(cfg, "bfloat16", batch=2, tokens=100) == 2 * 26 * 4 * 256 * 2 * 100 * 2


def test_a_model_too_big_for_a_small_memory_is_refused_with_what_would_fit():
    cfg = published.architecture(paligemma2("10b", 224))
    with pytest.raises(memory_fit.DoesNotFit) as refused:
        memory_fit.check_fits(cfg, "float32", free=int(24e9), where="this GPU")
    message = str(refused.value)
    assert "needs about 39.0 GB in float32 (38.6 GB weights + 0.3 GB KV cache" in message
    assert "this GPU has 24.0 GB free" in message
    assert "dtype bfloat16 (19.5 GB)" in message
    assert "splitting" not in message  # bfloat16 already fits on one
    big = published.architecture(paligemma2("28b", 224))
    with pytest.raises(memory_fit.DoesNotFit) as refused:
        memory_fit.check_fits(big, "bfloat16", free=int(24e9), where="this GPU")
    assert "splitting it over 3 such devices" in str(refused.value)
    assert "a smaller checkpoint: PaliGemma 2 10B (19.3 GB in bfloat16)" in str(refused.value)


def test_int8_counts_a_byte_per_layer_matrix_weight_and_is_offered_where_float_does_not_fit():
    """PaliGemma 2 10B (Gemma 2 9B: 42 layers, width 3584, 16 query and 8 kv heads of 256, MLP 14336) on a
    16 GB T4, which runs float16: the decoder's layer matrices at a byte each, the rest at two."""
    cfg = published.architecture(paligemma2("10b", 224))
    per_layer = 16 * 3584 * 256 + 2 * 8 * 3584 * 256 + 16 * 256 * 3584 + 2 * 3584 * 14336 + 14336 * 3584
    matrices, rest = 42 * per_layer, 9_662_409_456 - 42 * per_layer
    estimate = memory_fit.estimate(cfg, "int8", float_dtype="float16")
    assert estimate.dtype == "int8" and estimate.kv_cache == memory_fit.kv_cache_bytes(cfg, "float16")
    assert 0 < estimate.weights - (matrices + 2 * rest) < 0.001 * estimate.weights  # + a scale per channel
    with pytest.raises(memory_fit.DoesNotFit) as refused:
        memory_fit.check_fits(cfg, "float16", free=int(16e9), where="this T4")
    assert "needs about 19.5 GB in float16" in str(refused.value)
    assert "dtype int8 (11.2 GB, float16 beside it)" in str(refused.value)
    assert memory_fit.check_fits(cfg, "int8", free=int(16e9), float_dtype="float16") == estimate


def test_fits_returns_the_estimate_and_measures_host_memory_on_cpu(monkeypatch):
    import psutil

    cfg = published.architecture(paligemma2("3b", 224))

    class Memory:
        available = int(4e9)

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory)
    with pytest.raises(memory_fit.DoesNotFit, match="host RAM has 4.0 GB free.*no published checkpoint"):
        memory_fit.check_fits(cfg, "bfloat16")
    Memory.available = int(64e9)
    assert memory_fit.check_fits(cfg, "bfloat16").weights == 3_032_094_960 * 2


def test_estimate_for_repo_reads_only_config_json(tmp_path, monkeypatch):
    from paligemma import hub

    path = tmp_path / "config.json"
    path.write_text(json.dumps(paligemma2("28b", 224)))
    asked = []
    monkeypatch.setattr(hub, "download_file", lambda repo, name, **kw: asked.append((repo, name)) or str(path))
    estimate = memory_fit.estimate_for_repo("google/paligemma2-28b-pt-224")
    assert asked == [("google/paligemma2-28b-pt-224", "config.json")]
    assert estimate.weights == 27_650_192_112 * 2
    assert memory_fit.describe_fit(estimate, int(80e9)).endswith("· fits")
    assert "needs" in memory_fit.describe_fit(estimate, int(24e9))


def test_a_default_load_steps_down_to_the_first_smaller_form_that_fits():
    """PaliGemma 2 3B with no dtype asked for: float32 on CPU, else bfloat16, else int8 matrices beside
    bfloat16 (beside float32 they would take more than bfloat16 alone); an asked dtype never steps down."""
    cfg = published.architecture(paligemma2("3b", 224))
    assert memory_fit.step_down("float32") == (("bfloat16", "bfloat16"), ("int8", "bfloat16"))
    assert memory_fit.step_down("float16") == (("int8", "float16"),)
    smaller = memory_fit.step_down("float32")
    float32, bfloat16 = memory_fit.estimate(cfg, "float32"), memory_fit.estimate(cfg, "bfloat16")
    int8 = memory_fit.estimate(cfg, "int8", float_dtype="bfloat16")
    assert int8.total < bfloat16.total < memory_fit.estimate(cfg, "int8", float_dtype="float32").total
    fit = memory_fit.check_fits
    assert fit(cfg, "float32", free=float32.total, float_dtype="float32", smaller=smaller) == float32
    assert fit(cfg, "float32", free=float32.total - 1, float_dtype="float32", smaller=smaller) == bfloat16
    assert fit(cfg, "float32", free=bfloat16.total - 1, float_dtype="float32", smaller=smaller) == int8
    with pytest.raises(memory_fit.DoesNotFit, match=r"needs about 1\d.\d GB in float32"):
        fit(cfg, "float32", free=int8.total - 1, float_dtype="float32", smaller=smaller)
    with pytest.raises(memory_fit.DoesNotFit):
        fit(cfg, "float32", free=float32.total - 1, float_dtype="float32")

    found = memory_fit.Requirements(None, float32, False, smaller=(bfloat16, int8))
    assert found.fitting(float32.total) is float32 and found.fitting(bfloat16.total) is bfloat16
    assert found.fitting(int8.total) is int8 and found.fitting(1000) is float32  # none fits: the default's need

"""The dtype and decode form chosen at load on CPU from measured figures (cpu_forms.py)."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paligemma
from paligemma import compile_cache, cpu_forms
from paligemma.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma.cpu_forms import CpuForm, Figures
from paligemma.out_major import OutMajor

VIEWS, OUT_MAJOR, STACKED, BF16, INT8 = cpu_forms.FORMS


def figures(
    views: float,
    stacked: float,
    bf16: float,
    int8: float = 1e9,
    bf16_prefill: float | None = 0.0,
    out_major: float = 1e9,
) -> dict:
    """Figures whose typical requests take the given milliseconds (decode only: prefill 0)."""
    steps = cpu_forms.TYPICAL_ANSWER_TOKENS
    return {
        VIEWS: Figures(views / steps, 0.0),
        OUT_MAJOR: Figures(out_major / steps, 0.0),
        STACKED: Figures(stacked / steps, 0.0),
        BF16: Figures(bf16 / steps, bf16_prefill),
        INT8: Figures(int8 / steps, 0.0),
    }


def test_pick_takes_the_fastest_float32_layout_and_bfloat16_only_by_the_margin():
    assert cpu_forms.pick(figures(100, 120, 90)) == VIEWS  # bfloat16 faster, not by the margin
    assert cpu_forms.pick(figures(130, 100, 90)) == STACKED
    assert cpu_forms.pick(figures(130, 100, 90, out_major=95)) == OUT_MAJOR  # float32 layouts: the fastest
    assert cpu_forms.pick(figures(100, 120, 100 / cpu_forms.OTHER_DTYPE_MARGIN)) == BF16
    assert cpu_forms.pick(figures(100, 120, 10, bf16_prefill=None)) == VIEWS  # not fully measured: never picked
    assert cpu_forms.pick(figures(100, 120, 70, int8=60)) == INT8  # the fastest of the other dtypes
    assert cpu_forms.pick({BF16: Figures(1.0, 1.0)}) == BF16  # the only candidate (dtype asked)


def test_only_large_models_on_cpu_are_measured():
    cpu = jax.devices("cpu")[0]
    real = PaliGemmaConfig(VisionConfig(), TextConfig())  # PaliGemma 3B: 0.30 GB per decoder layer in float32
    assert cpu_forms.applies(real, cpu)
    assert not cpu_forms.applies(paligemma.demo_config(257152), cpu)

    class Accelerator:
        platform = "gpu"

    assert not cpu_forms.applies(real, Accelerator())


def test_measuring_a_model_times_every_form_at_its_shapes(monkeypatch, tmp_path):
    """Real measurement, small shapes: every candidate timed, each float32 form's prefill in its own layout, and
    the pick what `pick` makes of the figures."""
    cfg = PaliGemmaConfig(
        VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=14, image_size=56),
        TextConfig(vocab_size=300, width=128, depth=6, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=32),
    )
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    choice = cpu_forms.choose(cfg)
    assert list(choice.figures) == list(cpu_forms.FORMS)
    for f in choice.figures.values():
        assert math.isfinite(f.decode_ms) and f.decode_ms > 0
    assert all(choice.figures[form].prefill_ms > 0 for form in (VIEWS, OUT_MAJOR, STACKED))
    assert choice.form == cpu_forms.pick(choice.figures)
    assert choice.measure_s > 0 and str(choice.form) in choice.describe()
    only_float32 = cpu_forms.choose(cfg, "float32")
    assert set(only_float32.figures) == {VIEWS, OUT_MAJOR, STACKED} and only_float32.form.dtype == "float32"
    assert all(f.prefill_ms is not None for f in only_float32.figures.values())
    assert cpu_forms.measure(cfg, [VIEWS])[VIEWS].prefill_ms is None  # nothing to compare it with


def test_forms_that_cannot_run_here_are_no_candidates(monkeypatch, tmp_path):
    """No per-layer views of these shapes, bfloat16 failing in XLA: measured without them; nothing measurable:
    no choice (the model then loads as without measuring)."""
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    cfg = PaliGemmaConfig(
        VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=14, image_size=28),
        TextConfig(vocab_size=300, width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=32),
    )
    decode_run = cpu_forms._decode_run

    def fails():
        raise RuntimeError("INTERNAL: no such kernel here")

    def failing_bfloat16(text, layers, dtype, cache_length):
        return fails if dtype == "bfloat16" else decode_run(text, layers, dtype, cache_length)

    monkeypatch.setattr(cpu_forms, "per_layer_views", lambda layers: None)
    monkeypatch.setattr(cpu_forms, "_decode_run", failing_bfloat16)
    choice = cpu_forms.choose(cfg)
    assert set(choice.figures) == {STACKED, INT8} and choice.form in (STACKED, INT8)

    monkeypatch.setattr(cpu_forms, "_decode_run", lambda *args: fails)
    assert cpu_forms.choose(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, width=96))) is None


def test_forms_are_timed_in_turns_so_other_work_meanwhile_slows_them_alike(monkeypatch):
    """The CPU busy with something else (another model's request, another process) for the first runs of a
    measurement must not make the form timed then look slow: each form's fastest turn is its own speed."""
    cfg = PaliGemmaConfig(
        VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=14, image_size=28),
        TextConfig(vocab_size=300, width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=32),
    )
    clock = {"s": 0.0, "runs": 0}

    def run_taking(ms):
        def run():
            clock["runs"] += 1
            clock["s"] += ms / 1e3 * (10 if clock["runs"] <= 4 else 1)  # ten times slower while the CPU is shared
            return jnp.zeros(())

        return run

    decode_ms, prefill_ms = iter([30.0, 25.0, 150.0]), iter([500.0, 400.0, 600.0])  # VIEWS, OUT_MAJOR, STACKED
    monkeypatch.setattr(cpu_forms, "_decode_run", lambda *args: run_taking(next(decode_ms)))
    monkeypatch.setattr(cpu_forms, "_prefill_run", lambda *args: run_taking(next(prefill_ms)))
    monkeypatch.setattr(cpu_forms.time, "perf_counter", lambda: clock["s"])
    figures = cpu_forms.measure(cfg, [VIEWS, OUT_MAJOR, STACKED])
    assert {form: f.decode_ms for form, f in figures.items()} == pytest.approx({VIEWS: 30, OUT_MAJOR: 25, STACKED: 150})
    assert figures[VIEWS].prefill_ms == pytest.approx(500)  # 4 image + 16 prompt rows: measured at full length
    assert cpu_forms.pick(figures) == OUT_MAJOR


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Every model counts as large; `measured.figures` is what measuring returns, and each call is recorded.
    Choices are remembered in this test's own folder."""
    calls = []
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))

    def measure(cfg, forms):
        calls.append(list(forms))
        return {form: measured.figures[form] for form in forms}

    monkeypatch.setattr(cpu_forms, "MEASURE_MIN_LAYER_BYTES", 0)
    monkeypatch.setattr(cpu_forms, "measure", measure)
    measured.calls = calls
    return measured


def greedy(model, prompt="caption en") -> list[int]:
    image = np.full((28, 28, 3), 120, np.uint8)
    *_, last = model.run([image], [prompt], max_new_tokens=8)
    return last.token_ids[0]


def test_a_measured_stacked_form_decodes_stacked_with_the_same_tokens(tiny_model_dir, tiny_model, measured):
    measured.figures = figures(views=130, stacked=100, bf16=120)
    model = paligemma.load(str(tiny_model_dir))
    assert model.cpu_form.form == STACKED and model.dtype == jnp.float32
    assert model._generator.run_params is model.params  # no per-layer views
    assert tiny_model.cpu_form is None and tiny_model._generator.run_params is not tiny_model.params
    assert greedy(model) == greedy(tiny_model)
    for m, form in ((model, dict), (tiny_model, list)):  # prefill reads the layers in the form decode reads them
        prefill, _ = next(iter(m._generator._compiled.values()))
        assert isinstance(prefill.args_info[0][0]["llm"]["layers"], form)


def test_a_measured_out_major_form_is_remembered_and_loads_out_major(tiny_model_dir, tiny_model, measured):
    measured.figures = figures(views=130, stacked=120, bf16=140, out_major=100)
    model = paligemma.load(str(tiny_model_dir))
    again = paligemma.load(str(tiny_model_dir))
    assert model.cpu_form.form == again.cpu_form.form == OUT_MAJOR and again.cpu_form.remembered
    assert len(measured.calls) == 1
    assert isinstance(again.params["llm"]["layers"]["mlp"]["linear"], OutMajor)
    assert greedy(again) == greedy(tiny_model)


def test_another_dtype_is_taken_only_when_the_dtype_was_left_open(tiny_model_dir, measured, tmp_path):
    measured.figures = figures(views=100, stacked=120, bf16=50)
    model = paligemma.load(str(tiny_model_dir))
    assert model.cpu_form.form == BF16 and model.dtype == jnp.bfloat16 and model.dtype_name == "bfloat16"
    assert measured.calls[-1] == list(cpu_forms.FORMS)

    asked = paligemma.load(str(tiny_model_dir), dtype="float32")
    assert asked.cpu_form.form == VIEWS and asked.dtype == jnp.float32
    assert measured.calls[-1] == [VIEWS, OUT_MAJOR, STACKED]

    measured.figures = figures(views=100, stacked=120, bf16=90, int8=60)
    (tmp_path / "cpu_forms.json").unlink()  # forget the first pick
    model = paligemma.load(str(tiny_model_dir))
    assert model.cpu_form.form == INT8 and model.dtype_name == "int8" and model.dtype == jnp.float32

    calls = len(measured.calls)
    for dtype in ("bfloat16", "int8"):  # nothing to choose: not measured
        assert paligemma.load(str(tiny_model_dir), dtype=dtype).cpu_form is None
    assert len(measured.calls) == calls


def test_a_choice_is_remembered_per_cpu_kind_and_shapes(measured, tmp_path, monkeypatch):
    cfg = paligemma.demo_config(300)
    measured.figures = figures(views=100, stacked=120, bf16=50)
    first = cpu_forms.choose(cfg)
    again = cpu_forms.choose(cfg)
    assert len(measured.calls) == 1 and not first.remembered and again.remembered
    assert again.form == first.form == BF16 and again.figures == first.figures
    assert "remembered" in again.describe()

    assert cpu_forms.choose(cfg, "float32").form == VIEWS  # another question: measured
    wider = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, width=cfg.text.width * 2))
    cpu_forms.choose(wider)  # other shapes: measured
    assert len(measured.calls) == 3

    monkeypatch.setattr(cpu_forms, "cpu", lambda: {"cpu": "another CPU", "vector_flags": ["avx2"]})
    cpu_forms.choose(cfg)  # another CPU kind: measured
    assert len(measured.calls) == 4

    store = tmp_path / "cpu_forms.json"
    store.write_text("{ cut sho")  # unreadable: measured again, then rewritten whole
    assert not cpu_forms.choose(cfg).remembered and cpu_forms.choose(cfg).remembered
    store.write_text(json.dumps({key: {"form": "float32"} for key in json.loads(store.read_text())}))
    assert not cpu_forms.choose(cfg).remembered  # records of another shape: measured again

    monkeypatch.setenv(compile_cache.ENV, "off")  # no cache folder: measured every time
    cpu_forms.choose(cfg)
    cpu_forms.choose(cfg)
    assert len(measured.calls) == 8


def test_a_load_says_it_measures_the_first_time_only_and_the_page_shows_it(tiny_model_dir, measured, tmp_path):
    from playground import registry
    from playground.manager import ModelManager

    measured.figures = figures(views=100, stacked=120, bf16=130)
    said = []
    paligemma.load(str(tiny_model_dir), status=said.append)
    assert said == [cpu_forms.MEASURING, "reading the weights"]
    said.clear()
    paligemma.load(str(tiny_model_dir), status=said.append)  # remembered: no pause to explain
    assert said == ["reading the weights"]

    (tmp_path / "cpu_forms.json").unlink()
    (tmp_path / "models.json").write_text(json.dumps({"models": [{"name": "mine", "source": str(tiny_model_dir)}]}))
    manager = ModelManager(registry.build(str(tmp_path / "no-demo"), str(tmp_path / "models.json")))
    steps = []
    manager.get("mine", progress=lambda fraction, message: steps.append(message), poll_s=0.01)
    assert cpu_forms.MEASURING in steps and steps.index(cpu_forms.MEASURING) < steps.index("reading the weights")
    assert steps[-1] == "ready"


def test_the_cli_says_what_it_measured_the_first_time_only(tiny_model_dir, measured, tmp_path, capsys):
    from PIL import Image

    from paligemma.__main__ import main

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    measured.figures = figures(views=130, stacked=100, bf16=120)
    argv = ["predict", "--model", str(tiny_model_dir), "--image", str(tmp_path / "red.png"), "--prompt", "caption en"]
    assert main([*argv, "--max-new-tokens", "2"]) == 0
    assert "measured this CPU's fastest form: float32, stacked layers" in capsys.readouterr().err
    assert main([*argv, "--max-new-tokens", "2"]) == 0
    assert "measured" not in capsys.readouterr().err  # remembered


def test_small_models_are_not_measured(tiny_model_dir, monkeypatch):
    def measure(cfg, forms):
        raise AssertionError("a small model was measured")

    monkeypatch.setattr(cpu_forms, "measure", measure)
    model = paligemma.load(str(tiny_model_dir))
    assert model.cpu_form is None and model.dtype == jnp.float32


def test_a_typical_request_is_its_prefill_and_the_answers_decode_steps():
    f = Figures(decode_ms=2.0, prefill_ms=10.0)
    assert f.request_ms == 10.0 + 2.0 * cpu_forms.TYPICAL_ANSWER_TOKENS
    assert dataclasses.replace(f, prefill_ms=None).request_ms == 2.0 * cpu_forms.TYPICAL_ANSWER_TOKENS
    assert str(CpuForm("float32", True)) == "float32, per-layer views"
    assert str(OUT_MAJOR) == "float32, per-layer views, out-major MLP"

"""The dtype and decode form of a large model on CPU, chosen at load from figures measured on this CPU.

What is fast differs between CPU kinds. On AVX2 machines and AVX-512 ones without AMX, XLA multiplies a row by
a float32 matrix near memory bandwidth and by a bfloat16 or int8 one several times more slowly; AMX tiles
multiply bfloat16 natively and VNNI/AMX int8, where fewer bytes per weight could shorten a decode step. The
per-layer weight views of cpu_memory.py beat the stacked layer scan on the machines measured so far, but that is
a property of the machine too, and so is the layout the MLP matrices read fastest in (out_major.py). So `choose`
times each candidate form on two decoder layers at the model's own shapes (constant weights: the time of a
product does not depend on its values, and the checkpoint is not read yet) and keeps the form with the shortest
typical request. The pick and its figures are remembered per CPU kind (model, vector features, usable cores),
JAX version and layer shapes in the compilation cache's folder (compile_cache.py), so a restarted app does not
measure again; delete `cpu_forms.json` there to measure afresh.

Only models whose decoder layer is at least MEASURE_MIN_LAYER_BYTES are measured: a small model's step is
dominated by fixed per-step costs where the forms measure alike (and the demo model answers the same on every
machine). bfloat16 and int8 change the numbers (by their tolerance, as on accelerators), so they are taken only
when the caller left the dtype open and are OTHER_DTYPE_MARGIN faster than the best float32 form; the float32
forms give the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import traverse_util

from . import compile_cache, gemma, quantize
from .config import PaliGemmaConfig, TextConfig
from .cpu_kind import cpu
from .cpu_memory import per_layer_views
from .out_major import KEYS as OUT_MAJOR_KEYS
from .out_major import OutMajor, swapped_last_two
from .params import expected_shapes
from .whole_files import written_whole

# A decoder layer of Gemma 2B is 0.45 GB in float32 and PaliGemma 2 3B's 0.30 GB; the demo model's and the
# test models' are a few MB.
MEASURE_MIN_LAYER_BYTES = 64 * 2**20
# bfloat16 or int8 is taken over float32 only when a typical request is this many times faster in it.
OTHER_DTYPE_MARGIN = 1.25
# A typical request: the image tokens plus this many prompt tokens are prefilled, this many tokens decoded.
TYPICAL_PROMPT_TOKENS = 16
TYPICAL_ANSWER_TOKENS = 32
# The measured prefill's rows at most (fewer make the weights' one-off transposes dominate), scaled to the prompt.
PREFILL_ROWS = 256
MEASURED_LAYERS = 2  # enough to see the layer scan's cost against per-layer views
# Each form's fastest of 2 to REPEATS timed turns (_fastest_in_turns).
REPEATS = 3
REPEAT_BUDGET_S = 0.3

# How forms are measured; a record made another way is measured again. 2: each form prefills in its own layout;
# 3: the forms are timed in turns.
METHOD = 3
# What a load says while it measures (load's `status`): a pause of seconds, once per CPU kind and model shape.
MEASURING = "measuring this CPU's fastest form for this model (first load on this CPU kind only)"


@dataclasses.dataclass(frozen=True)
class CpuForm:
    dtype: str  # the weights' dtype: "float32", "bfloat16", or "int8" (decoder layer matrices; float32 beside)
    layer_views: bool  # generate on per-layer views of the stacked weights (float32 only: DLPack has no bfloat16,
    # and int8 layers stay stacked, see cpu_memory.run_params)
    out_major: bool = False  # the MLP matrices stored out-major (out_major.py; float32)

    def __str__(self) -> str:
        layout = ", out-major MLP" if self.out_major else ""
        return f"{self.dtype}, {'per-layer views' if self.layer_views else 'stacked layers'}{layout}"


FORMS = (
    CpuForm("float32", True),
    CpuForm("float32", True, out_major=True),
    CpuForm("float32", False),
    CpuForm("bfloat16", False),
    CpuForm("int8", False),
)


@dataclasses.dataclass(frozen=True)
class Figures:
    """One form's measured figures on MEASURED_LAYERS layers. prefill_ms is None where it was not measured:
    where all candidates share one dtype (so one prefill), or where decoding alone already made the form lose."""

    decode_ms: float  # one decode step
    prefill_ms: float | None  # the prefill of a typical prompt, scaled from PREFILL_ROWS rows

    @property
    def request_ms(self) -> float:
        """A typical request: its prefill and TYPICAL_ANSWER_TOKENS decode steps (a lower bound without prefill)."""
        return (self.prefill_ms or 0.0) + TYPICAL_ANSWER_TOKENS * self.decode_ms


@dataclasses.dataclass(frozen=True)
class Choice:
    form: CpuForm
    figures: dict[CpuForm, Figures]
    measure_s: float  # what measuring took
    remembered: bool = False  # read from the figures of an earlier measurement on this CPU kind

    def describe(self) -> str:
        """One line for logs and benchmarks: the pick, then each candidate's figures."""
        parts = []
        for form, f in self.figures.items():
            prefill = "prefill not measured" if f.prefill_ms is None else f"prefill {f.prefill_ms:.0f} ms"
            parts.append(f"{form}: decode {f.decode_ms:.1f} ms/step, {prefill}")
        when = "remembered from an earlier measurement" if self.remembered else "measured"
        return f"{self.form} (on {MEASURED_LAYERS} layers: {'; '.join(parts)}; {when} in {self.measure_s:.1f} s)"

    def to_json(self) -> dict:
        return {
            "form": dataclasses.asdict(self.form),
            "figures": [{**dataclasses.asdict(form), **dataclasses.asdict(f)} for form, f in self.figures.items()],
            "measure_s": self.measure_s,
        }

    @classmethod
    def from_json(cls, data: dict) -> Choice:
        figures = {
            CpuForm(f["dtype"], f["layer_views"], f.get("out_major", False)): Figures(f["decode_ms"], f["prefill_ms"])
            for f in data["figures"]
        }
        return cls(CpuForm(**data["form"]), figures, data["measure_s"], remembered=True)


def applies(cfg: PaliGemmaConfig, device: jax.Device) -> bool:
    """Whether a model is large enough, and on a CPU, for its form to be measured rather than the default."""
    layers = sum(math.prod(shape) for key, shape in expected_shapes(cfg).items() if key.startswith("llm/layers/"))
    return device.platform == "cpu" and 4 * layers // cfg.text.depth >= MEASURE_MIN_LAYER_BYTES


def pick(figures: dict[CpuForm, Figures]) -> CpuForm:
    """The float32 form with the shortest typical request, or another dtype's where it is OTHER_DTYPE_MARGIN
    times shorter (and fully measured)."""
    request = {form: f.request_ms for form, f in figures.items()}
    float32 = [form for form in figures if form.dtype == "float32"]
    best = min(float32, key=request.__getitem__) if float32 else None
    for form in sorted((f for f in figures if f.dtype != "float32"), key=request.__getitem__):
        if best is None or figures[form].prefill_ms is not None and request[form] * OTHER_DTYPE_MARGIN <= request[best]:
            return form
    return best


def choose(
    cfg: PaliGemmaConfig, dtype: str | None = None, measuring: Callable[[], None] | None = None
) -> Choice | None:
    """Measures the candidate forms for cfg's decoder on this CPU and picks one. dtype: None (any candidate)
    or the one float dtype the load takes (then only the layout is chosen). None where that leaves no choice
    (bfloat16 has one form) or no candidate could be measured (then the model loads as it would without
    measuring). measuring: called before a measurement (not for a remembered choice), so that a caller can say
    why its load pauses."""
    forms = [form for form in FORMS if dtype is None or form.dtype == dtype]
    if len(forms) < 2:
        return None
    key, store = _key(cfg, dtype), _store_path()
    remembered = _read(store).get(key) if store else None
    if remembered is not None:
        try:
            return Choice.from_json(remembered)
        except (KeyError, TypeError, ValueError):  # not a record this version wrote: measure again
            pass
    if measuring is not None:
        measuring()
    start = time.perf_counter()
    figures = measure(cfg, forms)
    if not figures:
        return None
    choice = Choice(pick(figures), figures, time.perf_counter() - start)
    if store:
        _remember(store, key, choice)
    return choice


def _store_path() -> str | None:
    folder = compile_cache.cache_dir()
    return None if folder is None else os.path.join(folder, "cpu_forms.json")


def _key(cfg: PaliGemmaConfig, dtype: str | None) -> str:
    """What the figures depend on: the CPU kind and the cores this process may use, JAX, the shapes measured,
    the candidates (a new one is measured rather than never tried) and how they are measured."""
    kind = cpu()
    text = dataclasses.asdict(dataclasses.replace(cfg.text, depth=MEASURED_LAYERS, vocab_size=0))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # Linux: usable
    parts = (kind["cpu"], kind["vector_flags"], cores, jax.__version__, text, [str(form) for form in FORMS], METHOD)
    return repr((*parts, cfg.vision.num_patches, dtype))


def _read(store: str) -> dict:
    """The remembered choices; none where the file is missing or unreadable (then they are measured again)."""
    try:
        with open(store) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(store: str, key: str, choice: Choice) -> None:
    """Adds a choice to the store, written whole (readers never see half of it); a folder that cannot be written
    only means measuring again next time."""
    data = {**_read(store), key: choice.to_json()}
    try:
        os.makedirs(os.path.dirname(store), exist_ok=True)
        with written_whole(store, "w") as f:
            json.dump(data, f, indent=1)
    except OSError:
        pass


def measure(cfg: PaliGemmaConfig, forms) -> dict[CpuForm, Figures]:
    """Each form's figures on MEASURED_LAYERS decoder layers at cfg's shapes, in the order of `forms`. The forms
    are timed in turns (a run of each, then again: `_fastest_in_turns`), so that other work on the CPU meanwhile
    (another model's request, another process) slows them alike instead of whichever form was being measured.
    Prefills (the slowest part of measuring; generation prefills on the layers in the form it decodes them) are
    measured only where forms compete, another dtype's only where its decode steps alone leave it a chance
    against the best float32 request. A form this machine cannot run (XLA's error, no memory) is no candidate."""
    text = dataclasses.replace(cfg.text, depth=MEASURED_LAYERS)
    prompt_rows = cfg.vision.num_patches + TYPICAL_PROMPT_TOKENS
    rows = min(prompt_rows, PREFILL_ROWS)
    stacked, decodes, prefills = {}, {}, {}  # stacked layers by (dtype, out-major): views share them
    for form in forms:
        try:
            key = (form.dtype, form.out_major)
            if key not in stacked:
                stacked[key] = _constant_layers(cfg, text, form.dtype, form.out_major)
            decoded = per_layer_views(stacked[key]) if form.layer_views else stacked[key]
            if decoded is None:  # no views of these shapes: generation would decode stacked too
                continue
            decodes[form] = _decode_run(text, decoded, form.dtype, prompt_rows + TYPICAL_ANSWER_TOKENS)
            prefills[form] = _prefill_run(text, decoded, form.dtype, rows)
        except (RuntimeError, MemoryError):
            continue

    def prefill_figures(chosen) -> dict[CpuForm, float]:  # scaled from the measured rows to the whole prompt
        timed = _fastest_in_turns({form: prefills[form] for form in chosen})
        return {form: ms * prompt_rows / rows for form, ms in timed.items()}

    decode_ms = _fastest_in_turns(decodes)
    prefill_ms = {}
    if len(forms) > 1:
        float32 = [form for form in decode_ms if form.dtype == "float32"]
        prefill_ms = prefill_figures(float32)
        best = min((Figures(decode_ms[form], ms).request_ms for form, ms in prefill_ms.items()), default=None)
        chances = [
            form
            for form in decode_ms
            if form.dtype != "float32"
            and (best is None or TYPICAL_ANSWER_TOKENS * decode_ms[form] * OTHER_DTYPE_MARGIN <= best)
        ]
        prefill_ms |= prefill_figures(chances)
        attempted = {*float32, *chances}  # a form whose prefill failed is no candidate
        decode_ms = {form: ms for form, ms in decode_ms.items() if form in prefill_ms or form not in attempted}
    return {form: Figures(decode_ms[form], prefill_ms.get(form)) for form in forms if form in decode_ms}


def _constant_layers(cfg: PaliGemmaConfig, text: TextConfig, dtype: str, out_major: bool = False) -> dict:
    """The decoder's stacked layer weights, every matrix value 0.01 (norm scales 0); for int8, the layer
    matrices as int8 values with float32 per-channel scales, as load(dtype="int8") makes them; out_major: the
    MLP matrices as load(out_major) holds them."""
    flat = {}
    for key, shape in expected_shapes(dataclasses.replace(cfg, text=text)).items():
        if not key.startswith("llm/layers/"):
            continue
        contracted = quantize.CONTRACTED_AXES.get(key)
        if key.endswith("/scale"):
            flat[key] = jnp.zeros(shape, _float_dtype(dtype))
        elif dtype == quantize.INT8 and contracted is not None:
            scales = jnp.full(quantize.scale_shape(shape, contracted), 0.01, jnp.float32)
            flat[key] = quantize.int8_array(jnp.ones(shape, jnp.int8), scales)
        elif out_major and key in OUT_MAJOR_KEYS:
            flat[key] = OutMajor(jnp.full(swapped_last_two(shape), 0.01, dtype))
        else:
            flat[key] = jnp.full(shape, 0.01, dtype)
    return traverse_util.unflatten_dict(flat, sep="/")["llm"]["layers"]


def _float_dtype(dtype: str) -> str:
    """The float dtype beside a form's weights: float32 beside int8 (as load gives on CPU)."""
    return "float32" if dtype == quantize.INT8 else dtype


def _llm(layers, text: TextConfig, dtype: str) -> dict:
    dtype = _float_dtype(dtype)
    return {
        "layers": layers,
        "embedder": {"input_embedding": jnp.zeros((1, text.width), dtype)},  # gives run_layers the float dtype
        "final_norm": {"scale": jnp.zeros((text.width,), dtype)},
    }


@functools.partial(jax.jit, static_argnames="text")
def _prefill(llm, x, *, text: TextConfig):
    rows = x.shape[1]
    mask = jnp.ones((1, rows, rows), bool)
    return gemma.run_layers(llm, text, x, jnp.arange(rows)[None], mask)[:2]


@functools.partial(jax.jit, static_argnames="text", donate_argnums=2)
def _decode(llm, x, cache, index, *, text: TextConfig):
    length = gemma.cache_length(cache)
    mask = (jnp.arange(length) <= index)[None, None]  # [1, 1, S]
    hidden, cache, _ = gemma.run_layers(llm, text, x, index[None, None], mask, cache, index)
    return hidden, cache


def _fastest_in_turns(runs: dict) -> dict:
    """Each run's fastest time in ms, of 2 to REPEATS turns after an untimed run (which compiles); a turn times
    every run once, a third only while the turns so far took under REPEAT_BUDGET_S per run. The fastest, since
    interference (another process, a page fault) only ever adds time. A run that fails is left out."""
    ready = {}
    for key, run in runs.items():
        try:
            jax.block_until_ready(run())
        except (RuntimeError, MemoryError):
            continue
        ready[key] = run
    times = {key: [] for key in ready}
    turns, spent = 0, 0.0
    while ready and (turns < 2 or turns < REPEATS and spent < REPEAT_BUDGET_S * len(ready)):
        for key, run in ready.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[key].append(time.perf_counter() - start)
            spent += times[key][-1]
        turns += 1
    return {key: 1e3 * min(t) for key, t in times.items()}


def _prefill_run(text: TextConfig, layers, dtype: str, rows: int) -> Callable[[], jax.Array]:
    llm = _llm(layers, text, dtype)
    x = jnp.full((1, rows, text.width), 0.01, llm["embedder"]["input_embedding"].dtype)
    return lambda: _prefill(llm, x, text=text)


def _decode_run(text: TextConfig, layers, dtype: str, cache_length: int) -> Callable[[], jax.Array]:
    """One decode step at position cache_length // 2 per call, its cache donated and kept for the next."""
    llm = _llm(layers, text, dtype)
    dtype = llm["embedder"]["input_embedding"].dtype
    shape = (1, text.num_kv_heads, cache_length, text.head_dim)
    if isinstance(layers, list):
        cache = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in layers]
    else:
        cache = tuple(jnp.zeros((text.depth, *shape), dtype) for _ in range(2))
    x = jnp.full((1, 1, text.width), 0.01, dtype)
    index = jnp.int32(cache_length // 2)
    state = {"cache": cache}

    def step():
        hidden, state["cache"] = _decode(llm, x, state["cache"], index, text=text)
        return hidden

    return step

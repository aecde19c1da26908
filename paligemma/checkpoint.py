"""Checkpoint readers (big_vision .npz, Hugging Face safetensors folders) and the .npz writer.

Both readers produce the same thing: lazy tensors under our big_vision-style keys, each with a shape
known before any data is read. The config is derived from those shapes, every leaf is checked against
it, and then leaves are read one at a time, cast to the target dtype and placed on the device, so the
host never holds a second full copy of the weights.

On CPU a leaf is read straight into a 64-byte-aligned host buffer that XLA then adopts without copying
(DLPack), so loading a checkpoint peaks at about the weight bytes, not weights + the largest leaf. With a
mesh (see sharding.py) each leaf goes straight into its shards on the devices.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import zipfile
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from . import sharding as sharding_lib
from .config import CheckpointError, PaliGemmaConfig, config_from_shapes, overrides_from_hf_config
from .params import expected_shapes


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


# ---------------------------------------------------------------- big_vision .npz


def _npz_member_shape(archive: zipfile.ZipFile, member: str) -> tuple[int, ...]:
    with archive.open(member) as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(f)
    return tuple(shape)


_CHUNK_BYTES = 64 * 2**20
ALIGNMENT = 64  # what XLA on CPU needs to adopt a host buffer without copying it


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ALIGNMENT-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start: start + nbytes].view(dtype).reshape(shape)


def _numeric_dtype(dtype: np.dtype) -> np.dtype:
    """np.save writes bfloat16 as raw 2-byte voids; read them as bfloat16 again."""
    return np.dtype(ml_dtypes.bfloat16) if dtype.kind == "V" and dtype.itemsize == 2 else dtype


def _read_npy(f, name: str) -> np.ndarray:
    """One .npy stream (positioned at its magic string) into an aligned array, chunk by chunk."""
    major, _ = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    if dtype.hasobject:
        raise CheckpointError(f"tensor '{name}' holds Python objects; only numeric arrays are accepted (no pickles)")
    out = aligned_empty(tuple(shape[::-1] if fortran_order else shape), _numeric_dtype(dtype))
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done: done + _CHUNK_BYTES])
        if not n:
            raise CheckpointError(f"tensor '{name}' ends after {done} of {len(buffer)} bytes (truncated file?)")
        done += n
    return out.T if fortran_order else out


def _npz_member_reader(path: str, archive: zipfile.ZipFile, member: str):
    """A file object at the start of a member's .npy bytes: the file itself for stored members (np.savez),
    read without a copy through zipfile, or zipfile's decompressing stream (np.savez_compressed)."""
    info = archive.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return archive.open(member)
    f = open(path, "rb")
    f.seek(info.header_offset)
    local_header = f.read(30)  # fixed part of the zip local file header
    if local_header[:4] != b"PK\x03\x04":
        f.close()
        raise CheckpointError(f"{path}: member '{member}' has no zip local header (corrupt file?)")
    name_len, extra_len = int.from_bytes(local_header[26:28], "little"), int.from_bytes(local_header[28:30], "little")
    f.seek(info.header_offset + 30 + name_len + extra_len)
    return f


def read_npz(path: str) -> dict[str, LazyTensor]:
    """Lazy tensors of a big_vision .npz: keys with or without 'params/', qkv_einsum split into q + kv."""
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"{path} is not a readable big_vision .npz checkpoint (a zip of .npy arrays): {err}") from None

    def loader(member, name):
        def load():
            try:
                with _npz_member_reader(path, archive, member) as f:
                    return _read_npy(f, name)
            except CheckpointError as err:
                raise CheckpointError(f"{path}: {err}") from None
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
                raise CheckpointError(f"{path}: tensor '{name}' could not be read (truncated or corrupt file?): {err}") from None
        return load

    tensors = {}
    try:
        for member in archive.namelist():
            name = member[:-4] if member.endswith(".npy") else member
            key = name.removeprefix("params/")
            tensors[key] = LazyTensor(_npz_member_shape(archive, member), loader(member, name))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"{path}: could not read the array headers (truncated or corrupt file?): {err}") from None
    return _split_qkv(tensors)


def _split_qkv(tensors: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    """Gemma stores one qkv_einsum [L, 3, N, D, H] when heads == kv heads; we always use q + kv."""
    key = "llm/layers/attn/qkv_einsum/w"
    if key not in tensors:
        return tensors
    qkv = tensors.pop(key)
    layers, _, heads, width, head_dim = qkv.shape
    tensors["llm/layers/attn/q_einsum/w"] = LazyTensor((layers, heads, width, head_dim), lambda: qkv.load()[:, 0])
    tensors["llm/layers/attn/kv_einsum/w"] = LazyTensor((layers, 2, heads, width, head_dim), lambda: qkv.load()[:, 1:])
    return tensors


def save_npz(path: str, params) -> None:
    """Writes params in the big_vision layout ("/"-joined keys, stacked layers), any float dtype."""
    flat = traverse_util.flatten_dict(params, sep="/")
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


# ---------------------------------------------------------------- Hugging Face folders

# The 2024 Hub checkpoints ('vision_tower.vision_model.', 'language_model.model.'), transformers 4.5x
# ('model.vision_tower.vision_model.', 'model.language_model.') and 5.x ('vision_tower.') name the parts
# differently; each part is found by a tensor only it has.
_PART_MARKERS = {"vision": "post_layernorm.weight", "projector": "multi_modal_projector.linear.weight",
                 "text": "embed_tokens.weight"}


def _part_prefixes(names, folder: str) -> tuple[str, str, str]:
    prefixes = []
    for part, marker in _PART_MARKERS.items():
        found = [n[: -len(marker)] for n in names if n.endswith(marker)]
        if len(found) != 1:
            raise CheckpointError(
                f"{folder}: expected one '*{marker}' tensor of the {part} part of a PaliGemma checkpoint "
                f"(e.g. 'vision_tower.vision_model.post_layernorm.weight'), found {len(found)}")
        prefixes.append(found[0] + ("multi_modal_projector.linear." if part == "projector" else ""))
    return tuple(prefixes)


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(map(os.path.basename, missing))}")
        return files
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weights")
    return files


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _hf_tensors(folder: str) -> dict[str, LazyTensor]:
    """Raw HF tensors by their own names, lazily, across shards. safetensors validates each file; the
    bytes are then read by offset straight into aligned buffers (its own reader returns fresh arrays)."""
    tensors = {}
    for file in _safetensors_files(folder):
        try:
            with safe_open(file, framework="numpy") as f:
                names = list(f.keys())
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None
        for name in names:
            entry = header[name]
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file}: tensor '{name}' has dtype {entry['dtype']}; accepted: "
                                      f"{', '.join(_SAFETENSORS_DTYPES)}")
            tensors[name] = LazyTensor(tuple(entry["shape"]), _safetensor_loader(file, name, 8 + header_len, entry))
    return tensors


def _safetensor_loader(file: str, name: str, data_start: int, entry: dict) -> Callable[[], np.ndarray]:
    def load():
        out = aligned_empty(tuple(entry["shape"]), _SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        with open(file, "rb") as f:
            f.seek(data_start + begin)
            if end - begin != out.nbytes or f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise CheckpointError(f"{file}: tensor '{name}' is truncated or its offsets do not match its shape")
        return out
    return load


def read_hf_folder(folder: str) -> tuple[dict[str, LazyTensor], dict]:
    """Lazy tensors of a transformers PaliGemma folder, renamed and re-laid to our keys; and config.json."""
    config_path = os.path.join(folder, "config.json")
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{config_path} not found: a Hugging Face PaliGemma folder needs config.json") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from None
    raw = _hf_tensors(folder)
    return _HFMapping(raw, *_part_prefixes(raw, folder), hf_config, folder).tensors(), hf_config


class _HFMapping:
    """Builds our lazy tensors from HF ones: transposes [out, in] Linear weights to [in, out], splits heads,
    and stacks per-layer tensors on a leading axis."""

    def __init__(self, raw, vision, projector, text, hf_config, folder):
        self.raw, self.v, self.p, self.t, self.folder = raw, vision, projector, text, folder
        vc, tc = hf_config.get("vision_config") or {}, hf_config.get("text_config") or {}
        self.v_heads = int(vc.get("num_attention_heads", 16))
        self.t_heads = int(tc.get("num_attention_heads", 8))
        self.kv_heads = int(tc.get("num_key_value_heads", self.t_heads))
        self.head_dim = int(tc.get("head_dim") or 256)
        self.v_layers = self._count_layers(self.v + "encoder.layers.")
        self.t_layers = self._count_layers(self.t + "layers.")

    def _count_layers(self, prefix: str) -> int:
        indices = {int(k[len(prefix):].split(".")[0]) for k in self.raw if k.startswith(prefix)}
        if not indices or indices != set(range(len(indices))):
            raise CheckpointError(f"{self.folder}: layers under '{prefix}' are missing or not numbered 0..n-1")
        return len(indices)

    def _get(self, name: str) -> LazyTensor:
        if name not in self.raw:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing")
        return self.raw[name]

    def _one(self, name, shape_fn, fn) -> LazyTensor:
        t = self._get(name)
        return LazyTensor(shape_fn(t.shape), lambda: fn(t.load()))

    def _stacked(self, names: list[str], shape_fn, fn) -> LazyTensor:
        """One leaf [L, ...] from L per-layer tensors, filled into a single preallocated array."""
        return self._stacked_parts([names], shape_fn, fn, squeeze=True)

    def _stacked_parts(self, names: list[list[str]], shape_fn, fn, squeeze: bool = False) -> LazyTensor:
        """One leaf [L, C, ...] from C lists of L per-layer tensors (e.g. k and v), filled layer by layer."""
        parts = [[self._get(n) for n in part] for part in names]
        inner = shape_fn(parts[0][0].shape)
        shape = (len(parts[0]), *inner) if squeeze else (len(parts[0]), len(parts), *inner)

        def load():
            out = None
            for c, part in enumerate(parts):
                for i, tensor in enumerate(part):
                    value = fn(tensor.load())
                    if out is None:
                        out = aligned_empty(shape, value.dtype)
                    out[(i,) if squeeze else (i, c)] = value
            return out
        return LazyTensor(shape, load)

    def tensors(self) -> dict[str, LazyTensor]:
        v, t = self.v, self.t
        vl = [f"{v}encoder.layers.{i}." for i in range(self.v_layers)]
        tl = [f"{t}layers.{i}." for i in range(self.t_layers)]
        nv, nt, kv, hd = self.v_heads, self.t_heads, self.kv_heads, self.head_dim
        transpose = lambda s: s[::-1]  # noqa: E731
        same = lambda s: s  # noqa: E731
        out = {
            "img/embedding/kernel": self._one(v + "embeddings.patch_embedding.weight",
                                              lambda s: (s[2], s[3], s[1], s[0]), lambda x: x.transpose(2, 3, 1, 0)),
            "img/embedding/bias": self._one(v + "embeddings.patch_embedding.bias", same, lambda x: x),
            "img/pos_embedding": self._one(v + "embeddings.position_embedding.weight", lambda s: (1, *s), lambda x: x[None]),
            "img/Transformer/encoder_norm/scale": self._one(v + "post_layernorm.weight", same, lambda x: x),
            "img/Transformer/encoder_norm/bias": self._one(v + "post_layernorm.bias", same, lambda x: x),
            "img/head/kernel": self._one(self.p + "weight", transpose, lambda x: x.T),
            "img/head/bias": self._one(self.p + "bias", same, lambda x: x),
            "llm/embedder/input_embedding": self._one(t + "embed_tokens.weight", same, lambda x: x),
            "llm/final_norm/scale": self._one(t + "norm.weight", same, lambda x: x),
        }
        block = "img/Transformer/encoderblock/"
        attn = block + "MultiHeadDotProductAttention_0/"
        for ours, theirs in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
            for leaf, suffix in (("scale", "weight"), ("bias", "bias")):
                out[f"{block}{ours}/{leaf}"] = self._stacked([p + f"{theirs}.{suffix}" for p in vl], same, lambda x: x)
        for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[f"{block}MlpBlock_0/{ours}/kernel"] = self._stacked([p + f"mlp.{theirs}.weight" for p in vl], transpose, lambda x: x.T)
            out[f"{block}MlpBlock_0/{ours}/bias"] = self._stacked([p + f"mlp.{theirs}.bias" for p in vl], same, lambda x: x)
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            # [N·Hd, W] -> [W, N, Hd]
            out[f"{attn}{ours}/kernel"] = self._stacked(
                [p + f"self_attn.{theirs}.weight" for p in vl], lambda s: (s[1], nv, s[0] // nv),
                lambda x: x.T.reshape(x.shape[1], nv, -1))
            out[f"{attn}{ours}/bias"] = self._stacked(
                [p + f"self_attn.{theirs}.bias" for p in vl], lambda s: (nv, s[0] // nv), lambda x: x.reshape(nv, -1))
        out[attn + "out/kernel"] = self._stacked(  # [W, N·Hd] -> [N, Hd, W]
            [p + "self_attn.out_proj.weight" for p in vl], lambda s: (nv, s[1] // nv, s[0]),
            lambda x: x.T.reshape(nv, -1, x.shape[0]))
        out[attn + "out/bias"] = self._stacked([p + "self_attn.out_proj.bias" for p in vl], same, lambda x: x)

        out["llm/layers/attn/q_einsum/w"] = self._stacked(  # [N·H, D] -> [N, D, H]
            [p + "self_attn.q_proj.weight" for p in tl], lambda s: (nt, s[1], hd),
            lambda x: x.reshape(nt, hd, x.shape[1]).transpose(0, 2, 1))
        out["llm/layers/attn/kv_einsum/w"] = self._kv_stacked(tl, kv, hd)
        out["llm/layers/attn/attn_vec_einsum/w"] = self._stacked(  # [D, N·H] -> [N, H, D]
            [p + "self_attn.o_proj.weight" for p in tl], lambda s: (nt, hd, s[0]),
            lambda x: x.reshape(x.shape[0], nt, hd).transpose(1, 2, 0))
        out["llm/layers/mlp/gating_einsum"] = self._gating_stacked(tl)
        out["llm/layers/mlp/linear"] = self._stacked([p + "mlp.down_proj.weight" for p in tl], transpose, lambda x: x.T)
        gemma2 = tl[0] + "pre_feedforward_layernorm.weight" in self.raw
        norms = ({"pre_attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                  "pre_ffw_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
                 if gemma2 else {"pre_attention_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"})
        for ours, theirs in norms.items():
            out[f"llm/layers/{ours}/scale"] = self._stacked([p + f"{theirs}.weight" for p in tl], same, lambda x: x)
        return out

    def _kv_stacked(self, tl, kv, hd) -> LazyTensor:
        """k_proj and v_proj [K·H, D] of each layer -> [L, 2, K, D, H]."""
        return self._stacked_parts([[p + f"self_attn.{n}.weight" for p in tl] for n in ("k_proj", "v_proj")],
                                   lambda s: (kv, s[1], hd), lambda x: x.reshape(kv, hd, x.shape[1]).transpose(0, 2, 1))

    def _gating_stacked(self, tl) -> LazyTensor:
        """gate_proj and up_proj [F, D] of each layer -> [L, 2, D, F]."""
        return self._stacked_parts([[p + f"mlp.{n}.weight" for p in tl] for n in ("gate_proj", "up_proj")],
                                   lambda s: s[::-1], lambda x: x.T)


# ---------------------------------------------------------------- shared: validate, cast, place


def materialize(tensors: Mapping[str, LazyTensor], cfg: PaliGemmaConfig, dtype, source: str, mesh=None):
    """Checks every expected leaf against the config, then reads, casts and places them one at a time
    (on one device, or split over `mesh` as sharding.py says)."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{source}: missing tensors {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{source}: tensor '{key}' has shape {tuple(tensors[key].shape)}, expected {shape}")
    shardings = sharding_lib.param_shardings(expected, mesh) if mesh is not None else {}
    flat = {}
    for key in expected:
        value = tensors[key].load()
        if tuple(value.shape) != expected[key]:
            raise CheckpointError(f"{source}: tensor '{key}' holds {value.shape}, its header said {expected[key]}")
        flat[key] = place(value, dtype, shardings.get(key))
        del value
    return traverse_util.unflatten_dict(flat, sep="/")


def place(value: np.ndarray, dtype, sharding=None) -> jax.Array:
    """A host array as a device array of `dtype`. On CPU without a sharding, XLA adopts an aligned host
    buffer (DLPack, no copy); a cast or a misaligned/strided source costs one copy of this leaf only."""
    dtype = np.dtype(dtype)
    if sharding is not None or jax.default_backend() != "cpu" or dtype.kind not in "fiu":  # bf16 has no DLPack code
        return jax.device_put(np.asarray(value, dtype), sharding)
    aligned = value.ctypes.data % ALIGNMENT == 0 and value.flags.c_contiguous and value.flags.writeable
    if value.dtype != dtype or not aligned:
        host = aligned_empty(value.shape, dtype)
        np.copyto(host, value, casting="unsafe")
        value = host
    return jax.dlpack.from_dlpack(value, copy=False)


def read_checkpoint(path: str) -> tuple[dict[str, LazyTensor], PaliGemmaConfig]:
    """Lazy tensors and the config of a .npz file or an HF folder."""
    if os.path.isdir(path):
        tensors, hf_config = read_hf_folder(path)
        overrides = overrides_from_hf_config(hf_config)
    else:
        tensors, overrides = read_npz(path), {}
    cfg = config_from_shapes({k: t.shape for k, t in tensors.items()}, overrides)
    return tensors, cfg


def load_params(path: str, dtype=None, mesh=None) -> tuple[dict, PaliGemmaConfig]:
    """Params on the default device, or split over `mesh` (sharding.make_mesh) for models too big for one."""
    tensors, cfg = read_checkpoint(path)
    return materialize(tensors, cfg, dtype or default_dtype(), path, mesh), cfg


def default_dtype():
    """bfloat16 on accelerators; float32 on CPU, where XLA's bf16 matrix-vector products are slow."""
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else jnp.float32

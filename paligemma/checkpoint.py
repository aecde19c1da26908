"""Checkpoint readers (big_vision .npz, Hugging Face safetensors folders) and the .npz writer.

Both readers produce the same thing: lazy tensors under our big_vision-style keys, each with a shape
known before any data is read. The config is derived from those shapes, every leaf is checked against
it, and then leaves are read one at a time, cast to the target dtype and placed on the device, so the
host never holds a second full copy of the weights.

On CPU a leaf is read straight into a 64-byte-aligned host buffer that XLA then adopts without copying
(DLPack, see cpu_memory.py), so loading a checkpoint peaks at about the weight bytes, not weights + the
largest leaf. With a mesh (see sharding.py) each leaf goes straight into its shards on the devices.
Hugging Face names and layouts come from hf_keys.py, which hf_export.py reads the other way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from . import hf_keys, host_copy, quantize
from . import out_major as out_major_lib
from . import sharding as sharding_lib
from .config import CheckpointError, PaliGemmaConfig, config_from_shapes, overrides_from_hf_config
from .cpu_memory import ALIGNMENT, aligned_empty
from .devices import default_dtype
from .params import expected_shapes


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor whose shape is known before its bytes are read. `per_layer`, where the format allows it, reads
    a stacked leaf [L, ...] one layer at a time, so a consumer that transforms each layer (int8 quantisation)
    never holds the whole leaf in float."""

    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    per_layer: Callable[[], Iterator[np.ndarray]] | None = None
    # where the format assembles the leaf from per-layer tensors (HF), the leaf read straight into another dtype:
    # a float32 checkpoint loaded in bfloat16 never holds a whole float32 leaf (a 3B's gate/up pair: 4.4 GB)
    load_in: Callable[[np.dtype], np.ndarray] | None = None

    def layers(self) -> Iterator[np.ndarray]:
        """The leaf's slices along axis 0, in order."""
        return self.per_layer() if self.per_layer is not None else iter(self.load())


# ---------------------------------------------------------------- big_vision .npz


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy stream positioned at its magic string; leaves it at the data."""
    major, _ = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    return tuple(shape), fortran_order, dtype


def _npz_member_shape(archive: zipfile.ZipFile, member: str) -> tuple[int, ...]:
    with archive.open(member) as f:
        return _read_npy_header(f)[0]


_CHUNK_BYTES = 64 * 2**20


def _numeric_dtype(dtype: np.dtype) -> np.dtype:
    """np.save writes bfloat16 as raw 2-byte voids; read them as bfloat16 again."""
    return np.dtype(ml_dtypes.bfloat16) if dtype.kind == "V" and dtype.itemsize == 2 else dtype


def _read_exactly(f, out: np.ndarray, name: str) -> np.ndarray:
    """Fills `out` (C-contiguous) from the stream, chunk by chunk."""
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done : done + _CHUNK_BYTES])
        if not n:
            raise CheckpointError(f"tensor '{name}' ends after {done} of {len(buffer)} bytes (truncated file?)")
        done += n
    return out


def _checked_npy_header(f, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The header of a .npy stream, refusing pickled objects; leaves the stream at the data."""
    shape, fortran_order, dtype = _read_npy_header(f)
    if dtype.hasobject:
        raise CheckpointError(f"tensor '{name}' holds Python objects; only numeric arrays are accepted (no pickles)")
    return shape, fortran_order, _numeric_dtype(dtype)


def _read_npy(f, name: str) -> np.ndarray:
    """One .npy stream (positioned at its magic string) into an aligned array."""
    shape, fortran_order, dtype = _checked_npy_header(f, name)
    out = _read_exactly(f, aligned_empty(shape[::-1] if fortran_order else shape, dtype), name)
    return out.T if fortran_order else out


def _read_npy_layers(f, name: str) -> Iterator[np.ndarray]:
    """One .npy stream's slices along axis 0, each read into its own aligned array. A Fortran-ordered array's
    slices are not contiguous in the file, so it is read whole first."""
    shape, fortran_order, dtype = _checked_npy_header(f, name)
    if fortran_order:
        yield from _read_exactly(f, aligned_empty(shape[::-1], dtype), name).T
        return
    for i in range(shape[0]):
        yield _read_exactly(f, aligned_empty(shape[1:], dtype), f"{name}[{i}]")


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
        raise CheckpointError(
            f"{path} is not a readable big_vision .npz checkpoint (a zip of .npy arrays): {err}"
        ) from None

    @contextlib.contextmanager
    def read_errors(name):
        try:
            yield
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            raise CheckpointError(
                f"{path}: tensor '{name}' could not be read (truncated or corrupt file?): {err}"
            ) from None

    def lazy(member, name):
        def load():
            with read_errors(name), _npz_member_reader(path, archive, member) as f:
                return _read_npy(f, name)

        def per_layer():
            with read_errors(name), _npz_member_reader(path, archive, member) as f:
                yield from _read_npy_layers(f, name)

        return LazyTensor(_npz_member_shape(archive, member), load, per_layer)

    tensors = {}
    try:
        for member in archive.namelist():
            name = member[:-4] if member.endswith(".npy") else member
            key = name.removeprefix("params/")
            tensors[key] = lazy(member, name)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"{path}: could not read the array headers (truncated or corrupt file?): {err}") from None
    return _split_qkv(tensors)


# big_vision's Gemma has one qkv_einsum [L, 3, N, D, H] when heads == kv heads, else q_einsum [L, N, D, H] and
# kv_einsum [L, 2, K, D, H]; in memory we always use q + kv.
_Q, _KV, _QKV = "llm/layers/attn/q_einsum/w", "llm/layers/attn/kv_einsum/w", "llm/layers/attn/qkv_einsum/w"


def _split_qkv(tensors: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    if _QKV not in tensors:
        return tensors
    qkv = tensors.pop(_QKV)
    layers, _, heads, width, head_dim = qkv.shape
    tensors[_Q] = LazyTensor(
        (layers, heads, width, head_dim), lambda: qkv.load()[:, 0], lambda: (layer[0] for layer in qkv.layers())
    )
    tensors[_KV] = LazyTensor(
        (layers, 2, heads, width, head_dim), lambda: qkv.load()[:, 1:], lambda: (layer[1:] for layer in qkv.layers())
    )
    return tensors


def save_npz(path, params) -> None:
    """Writes params as big_vision stores them ("/"-joined keys, stacked layers, qkv_einsum where its Gemma
    expects one), any float dtype, to a file name or an open binary file."""
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    if _Q in flat and flat[_Q].shape[1] == flat[_KV].shape[2]:  # N == K
        q, kv = flat.pop(_Q), flat.pop(_KV)
        flat[_QKV] = np.concatenate([q[:, None], kv], axis=1)
    np.savez(path, **flat)


# ---------------------------------------------------------------- Hugging Face folders


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


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


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
                raise CheckpointError(
                    f"{file}: tensor '{name}' has dtype {entry['dtype']}; accepted: {', '.join(_SAFETENSORS_DTYPES)}"
                )
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
    return _from_hf(_hf_tensors(folder), hf_config, folder), hf_config


def _from_hf(raw: dict[str, LazyTensor], hf_config: dict, folder: str) -> dict[str, LazyTensor]:
    """Our lazy tensors from HF ones, as hf_keys' table says."""
    prefixes = hf_keys.find_prefixes(raw, folder)
    vc, tc = hf_config.get("vision_config") or {}, hf_config.get("text_config") or {}
    text_heads = int(tc.get("num_attention_heads", 8))
    heads = {
        hf_keys.VISION: int(vc.get("num_attention_heads", 16)),
        hf_keys.TEXT: text_heads,
        hf_keys.KV: int(tc.get("num_key_value_heads", text_heads)),
    }
    depths = {
        part: _count_layers(raw, prefixes[part] + numbered, folder) for part, numbered in hf_keys.LAYER_PREFIXES.items()
    }

    def get(name: str) -> LazyTensor:
        if name not in raw:
            raise CheckpointError(f"{folder}: tensor '{name}' is missing")
        return raw[name]

    out = {}
    for entry in hf_keys.entries(hf_keys.has_post_norms(raw, prefixes[hf_keys.TEXT])):
        prefix = prefixes[entry.part]
        try:
            if entry.per_layer:
                layers = [[get(n) for n in entry.hf_names(prefix, i)] for i in range(depths[entry.part])]
                out[entry.ours] = _stacked(layers, entry, heads)
            else:
                tensor = get(entry.hf_names(prefix)[0])
                out[entry.ours] = LazyTensor(
                    entry.layout.shape_to_ours(tensor.shape, heads),
                    lambda t=tensor, layout=entry.layout: layout.to_ours(t.load(), heads),
                )
        except hf_keys.LayoutError as err:
            raise CheckpointError(f"{folder}: tensor '{entry.hf_names(prefix, 0)[0]}': {err}") from None
    return out


def _count_layers(raw, prefix: str, folder: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in raw if k.startswith(prefix)}
    if not indices or indices != set(range(len(indices))):
        raise CheckpointError(f"{folder}: layers under '{prefix}' are missing or not numbered 0..n-1")
    return len(indices)


def _stacked(layers: list[list[LazyTensor]], entry: hf_keys.Entry, heads: dict[str, int]) -> LazyTensor:
    """One leaf [L, ...] (or [L, C, ...] for a pair) from per-layer HF tensors, filled into one aligned array
    layer by layer, so the host holds one HF tensor beside it."""
    first = layers[0][0].shape
    odd = [t.shape for layer in layers for t in layer if t.shape != first]
    if odd:
        raise hf_keys.LayoutError(f"the per-layer tensors differ in shape ({first} and {odd[0]})")
    inner = entry.layout.shape_to_ours(first, heads)
    shape = (len(layers), len(entry.hf), *inner) if entry.pair else (len(layers), *inner)

    def per_layer():  # views in HF's memory order (out_major.py reads a Linear weight as it lies)
        for layer in layers:
            values = [entry.layout.to_ours(tensor.load(), heads) for tensor in layer]
            yield host_copy.stacked(values) if entry.pair else values[0]

    def load_in(dtype=None):
        out = None
        for i, value in enumerate(per_layer()):
            if out is None:
                out = aligned_empty(shape, value.dtype if dtype is None else dtype)
            host_copy.copy_into(out[i], value)
        return out

    return LazyTensor(shape, load_in, per_layer, load_in)


# ---------------------------------------------------------------- shared: validate, cast, place


def materialize(
    tensors: Mapping[str, LazyTensor],
    cfg: PaliGemmaConfig,
    dtype,
    source: str,
    mesh=None,
    int8=False,
    out_major=False,
):
    """Checks every expected leaf against the config, then reads, casts and places them one at a time
    (on one device, or split over `mesh` as sharding.py says). int8: the decoder's layer matrices are
    quantised as they are read, one layer at a time (quantize.py); everything else is `dtype`. out_major
    (one device, float): the MLP matrices are read layer by layer into out-major storage (out_major.py)."""
    if out_major and (mesh is not None or int8):
        raise ValueError("out-major MLP matrices are a one-device float form")
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
        if int8 and key in quantize.CONTRACTED_AXES:
            flat[key] = _quantized(tensors[key], key, expected[key], dtype, source, mesh)
            continue
        if out_major and key in out_major_lib.KEYS:
            try:
                stored = out_major_lib.read_transposed(tensors[key].layers(), expected[key], dtype)
            except ValueError as err:  # layers that do not match the header
                raise CheckpointError(f"{source}: tensor '{key}': {err}") from None
            flat[key] = out_major_lib.OutMajor(place(stored, dtype))
            continue
        tensor = tensors[key]
        value = tensor.load() if tensor.load_in is None else tensor.load_in(np.dtype(dtype))
        if tuple(value.shape) != expected[key]:
            raise CheckpointError(f"{source}: tensor '{key}' holds {value.shape}, its header said {expected[key]}")
        flat[key] = place(value, dtype, shardings.get(key))
        del value
    return traverse_util.unflatten_dict(flat, sep="/")


def _quantized(tensor: LazyTensor, key: str, shape: tuple[int, ...], dtype, source: str, mesh):
    """One stacked decoder matrix read layer by layer into int8 values and scales, placed like its float leaf."""

    def checked_layers():
        for layer in tensor.layers():
            if tuple(layer.shape) != shape[1:]:
                raise CheckpointError(f"{source}: a layer of '{key}' holds {layer.shape}, its header said {shape[1:]}")
            yield layer

    try:
        values, scales = quantize.quantize_layers(checked_layers(), shape, quantize.CONTRACTED_AXES[key], dtype)
    except CheckpointError:
        raise
    except ValueError as err:  # a layer count that does not match the header
        raise CheckpointError(f"{source}: tensor '{key}': {err}") from None
    where = (lambda a: sharding_lib.param_sharding(key, a.shape, mesh)) if mesh is not None else (lambda a: None)
    return quantize.int8_array(place(values, np.int8, where(values)), place(scales, dtype, where(scales)))


def place(value: np.ndarray, dtype, sharding=None) -> jax.Array:
    """A host array as a device array of `dtype`. On CPU without a sharding, XLA adopts an aligned host
    buffer (DLPack, no copy); a cast or a misaligned/strided source costs one copy of this leaf only."""
    dtype = np.dtype(dtype)
    if sharding is not None or jax.default_backend() != "cpu" or dtype.kind not in "fiu":  # bf16 has no DLPack code
        return jax.device_put(np.asarray(value, dtype), sharding)
    aligned = value.ctypes.data % ALIGNMENT == 0 and value.flags.c_contiguous and value.flags.writeable
    if value.dtype != dtype or not aligned:
        host = aligned_empty(value.shape, dtype)
        host_copy.copy_into(host, value)
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

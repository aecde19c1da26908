"""Our params (big_vision layout) → a transformers PaliGemma folder: config.json + safetensors shards.

The inverse of `checkpoint.read_hf_folder`, so transformers can run the very same weights as our model
(the benchmarks compare the two that way) and a model we trained can be shared in the Hub format:

    python -m paligemma.hf_export assets/demo /tmp/demo-hf

Tensor names and layouts come from hf_keys.py (the prefixes transformers 5 writes itself, lm_head tied).
The vocabulary is written as it is (no padding): the `<image>` placeholder id is the first id past the table,
which transformers maps to padding before its lookup.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Iterator

import numpy as np
from safetensors.numpy import save_file

from . import hf_keys
from .config import GEMMA2_ATTN_SOFTCAP, GEMMA2_FINAL_SOFTCAP, PaliGemmaConfig

DEFAULT_SHARD_BYTES = 4 * 2**30
# Gemma 2's sliding window was not applied in PaliGemma 2's training; a window past any sequence turns it off.
_NO_SLIDING_WINDOW = 8192


def hf_config(cfg: PaliGemmaConfig) -> dict:
    """config.json of a transformers PaliGemmaForConditionalGeneration with this architecture.

    Raises ValueError for what transformers cannot express (a Gemma 1 query scale other than head_dim^-½,
    or soft caps other than Gemma 2's).
    """
    v, t = cfg.vision, cfg.text
    text = dict(
        hidden_size=t.width,
        intermediate_size=t.mlp_dim,
        num_hidden_layers=t.depth,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim,
        vocab_size=t.vocab_size,
        rms_norm_eps=t.eps,
        hidden_activation="gelu_pytorch_tanh",
        hidden_act="gelu_pytorch_tanh",
        rope_theta=10_000.0,
        max_position_embeddings=_NO_SLIDING_WINDOW,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    if t.generation == 1:
        if not np.isclose(t.query_scale, t.head_dim**-0.5) or t.attn_softcap or t.final_softcap:
            raise ValueError(
                f"transformers' Gemma scales queries by head_dim^-½ = {t.head_dim**-0.5:g} and has no "
                f"soft caps; this decoder has query scale {t.query_scale:g} and caps "
                f"{t.attn_softcap}/{t.final_softcap}, so it cannot be exported as PaliGemma 1"
            )
        text["model_type"] = "gemma"
    else:
        if t.attn_softcap is None or t.final_softcap is None:
            raise ValueError(
                f"transformers' Gemma 2 always soft-caps (defaults {GEMMA2_ATTN_SOFTCAP}/"
                f"{GEMMA2_FINAL_SOFTCAP}); this decoder has caps {t.attn_softcap}/{t.final_softcap}"
            )
        scalar = t.query_scale**-2
        scalar = round(scalar) if np.isclose(scalar, round(scalar)) else scalar
        text.update(
            model_type="gemma2",
            query_pre_attn_scalar=scalar,
            attn_logit_softcapping=t.attn_softcap,
            final_logit_softcapping=t.final_softcap,
            sliding_window=_NO_SLIDING_WINDOW,
        )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=v.width,
        intermediate_size=v.mlp_dim,
        num_hidden_layers=v.depth,
        num_attention_heads=v.num_heads,
        patch_size=v.patch_size,
        image_size=v.image_size,
        layer_norm_eps=v.eps,
        hidden_act="gelu_pytorch_tanh",
        vision_use_head=False,
        projection_dim=t.width,
    )
    return dict(
        architectures=["PaliGemmaForConditionalGeneration"],
        model_type="paligemma",
        text_config=text,
        vision_config=vision,
        image_token_index=t.vocab_size,
        vocab_size=t.vocab_size,
        projection_dim=t.width,
        hidden_size=t.width,
        tie_word_embeddings=True,
    )


def hf_tensors(params, cfg: PaliGemmaConfig) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(HF name, function giving the tensor) for every tensor, each made only when asked for: hf_keys' table
    read ours -> HF, a part's whole-model tensors first, then its layers one by one."""
    table = hf_keys.entries(cfg.text.post_norms)
    depths = {hf_keys.VISION: cfg.vision.depth, hf_keys.TEXT: cfg.text.depth}
    for part, prefix in hf_keys.EXPORT_PREFIXES.items():
        in_part = [e for e in table if e.part == part]
        for entry in (e for e in in_part if not e.per_layer):
            leaf = _leaf(params, entry.ours)
            yield entry.hf_names(prefix)[0], lambda leaf=leaf, entry=entry: entry.layout.to_hf(np.asarray(leaf))
        for i in range(depths.get(part, 0)):
            for entry in (e for e in in_part if e.per_layer):
                leaf = _leaf(params, entry.ours)
                for c, name in enumerate(entry.hf_names(prefix, i)):
                    index = (i, c) if entry.pair else i  # [L, C, ...] or [L, ...]
                    yield name, lambda leaf=leaf, entry=entry, index=index: entry.layout.to_hf(np.asarray(leaf[index]))


def _leaf(params, key: str):
    for name in key.split("/"):
        params = params[name]
    return params


def export(
    params,
    cfg: PaliGemmaConfig,
    folder: str | os.PathLike,
    tokenizer_path: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> str:
    """Writes config.json, the weights (shards of at most `max_shard_bytes`, with an index when more than one)
    and, if given, tokenizer.model into `folder`. Only one shard is held in host memory at a time."""
    folder = os.fspath(folder)
    config = hf_config(cfg)  # raises before anything is written
    os.makedirs(folder, exist_ok=True)
    shards: list[tuple[str, list[str], int]] = []  # (file, tensor names, bytes) of each written part
    shard: dict[str, np.ndarray] = {}

    def flush() -> None:
        part = f"part-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, part), metadata={"format": "pt"})
        shards.append((part, list(shard), sum(x.nbytes for x in shard.values())))
        shard.clear()

    for name, make in hf_tensors(params, cfg):
        tensor = np.ascontiguousarray(make())
        if shard and sum(x.nbytes for x in shard.values()) + tensor.nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
    flush()
    _name_shards(folder, shards)
    config["dtype"] = np.dtype(params["llm"]["final_norm"]["scale"].dtype).name
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer_path:
        shutil.copy(tokenizer_path, os.path.join(folder, "tokenizer.model"))
    return folder


def _name_shards(folder: str, shards: list[tuple[str, list[str], int]]) -> None:
    """Renames the parts as transformers names shards; writes model.safetensors.index.json when there are several."""
    if len(shards) == 1:
        os.replace(os.path.join(folder, shards[0][0]), os.path.join(folder, "model.safetensors"))
        return
    weight_map = {}
    for number, (part, names, _) in enumerate(shards, 1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(folder, part), os.path.join(folder, final))
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": sum(size for *_, size in shards)}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def main(argv=None) -> None:
    import paligemma

    parser = argparse.ArgumentParser(prog="python -m paligemma.hf_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a model paligemma.load accepts (e.g. assets/demo)")
    parser.add_argument("out", help="folder to write the transformers PaliGemma into")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    args = parser.parse_args(argv)
    model = paligemma.load(args.source, dtype=args.dtype)
    export(model.params, model.config, args.out, model.tokenizer.path)
    print(args.out)


if __name__ == "__main__":
    main()

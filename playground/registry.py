"""Which models the playground offers: the embedded demo, a registry file, and an environment variable.

Visitors pick a model by name only; sources (local paths, Hub repo ids, `kaggle:` handles) come from here and
nowhere else.

Registry file, JSON or YAML:

    {"default": "demo",
     "models": [{"name": "PaliGemma 2 3B mix 224", "source": "google/paligemma2-3b-mix-224",
                 "notes": "gated: accept the licence, set HF_TOKEN", "dtype": "bfloat16"},
                {"name": "big_vision 3B", "source": "kaggle:google/paligemma-2/jax/paligemma2-3b-mix-224/1",
                 "tokenizer": "/data/paligemma_tokenizer.model", "mask_decoder": "/data/vae-oid.npz"}]}

`tokenizer` and `mask_decoder` are optional: without them both are looked up beside the weights, in the cache,
then where they are published (see paligemma/companions.py). Relative local paths are read relative to the file.
`tasks` (optional, e.g. ["caption", "detect"]) lists the tasks the page offers with the model, for a fine-tuned
checkpoint that knows only some; without it, all of them (the published checkpoints were taught every one).

Environment variable (comma-separated, `name=source` or a bare source named after itself):

    PALIGEMMA_MODELS="google/paligemma2-3b-mix-224,mine=/data/finetuned.npz"
"""

from __future__ import annotations

import dataclasses
import json
import os

import yaml

import paligemma
from playground import prompts

ENV_VAR = "PALIGEMMA_MODELS"
DEMO_NAME = "demo"
DEMO_NOTES = "Embedded demo: synthetic shapes (circle, square, triangle in red, green, blue, yellow); works offline."
DEMO_TASKS = ("caption", "answer", "detect", "segment")  # what scenes/ taught it: no describe, OCR or question


class RegistryError(ValueError):
    """A registry file or environment entry that cannot be used."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str  # an absolute local path, a Hugging Face Hub repo id, or a kaggle: handle
    notes: str = ""
    dtype: str | None = None  # None: as load() picks (accelerators: bfloat16; CPU: float32 or as measured)
    tokenizer: str | None = None  # absolute path; None: found beside the weights, cached or published
    mask_decoder: str | None = None  # absolute path of a vae-oid.npz; None: likewise
    tasks: tuple[str, ...] = prompts.TASK_NAMES  # the task names the page offers with this model

    @property
    def on_hub(self) -> bool:
        return paligemma.is_repo_id(self.source)

    @property
    def remote(self) -> bool:
        """Downloaded on first use (Hub or Kaggle) rather than read from this server's disk."""
        return not os.path.isabs(self.source)


@dataclasses.dataclass(frozen=True)
class Registry:
    entries: dict[str, ModelEntry]
    default: str

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> ModelEntry:
        if name not in self.entries:
            raise RegistryError(f"unknown model {name!r}; this server offers: {', '.join(self.entries)}")
        return self.entries[name]

    def local_sources(self) -> list[str]:
        """Local weight files and folders, so that the web server can refuse to serve them."""
        files = [path for item in self.entries.values() for path in (item.tokenizer, item.mask_decoder) if path]
        return [item.source for item in self.entries.values() if not item.remote] + files


FIELDS = ("name", "source", "notes", "dtype", "tokenizer", "mask_decoder", "tasks")


def entry(
    name: str,
    source: str,
    notes: str = "",
    dtype: str | None = None,
    base: str = ".",
    tokenizer: str | None = None,
    mask_decoder: str | None = None,
    tasks=None,
) -> ModelEntry:
    """A checked entry; `source` is a Hub repo id or a kaggle: handle unless it names a path (relative ones, and
    the companion paths, are joined to `base`)."""
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"a model needs a non-empty name, got {name!r}")
    if not isinstance(source, str) or not source.strip():
        raise RegistryError(f"model {name!r} needs a source: a local path or a Hugging Face repo id")
    if dtype is not None and dtype not in paligemma.DTYPE_NAMES:
        raise RegistryError(
            f"model {name!r}: unknown dtype {dtype!r}; accepted: {', '.join(paligemma.DTYPE_NAMES)} or none"
        )
    source = os.path.expanduser(source.strip())
    local = os.path.join(base, source)
    if not paligemma.is_kaggle_source(source) and (
        os.path.isabs(source) or os.path.exists(local) or not paligemma.is_repo_id(source)
    ):
        source = os.path.abspath(local)
    companions = []
    for field, path in (("tokenizer", tokenizer), ("mask_decoder", mask_decoder)):
        if path is not None and (not isinstance(path, str) or not path.strip()):
            raise RegistryError(f"model {name!r}: {field} must be the path of a file, got {path!r}")
        companions.append(os.path.abspath(os.path.join(base, os.path.expanduser(path.strip()))) if path else None)
    try:
        offered = prompts.TASK_NAMES if tasks is None else prompts.task_names(tasks)
    except ValueError as err:
        raise RegistryError(f"model {name!r}: {err}") from None
    return ModelEntry(name.strip(), source, str(notes or ""), dtype, *companions, offered)


def demo_entry(folder: str) -> ModelEntry:
    return ModelEntry(DEMO_NAME, os.path.abspath(folder), DEMO_NOTES, tasks=DEMO_TASKS)


def read_file(path: str) -> tuple[list[ModelEntry], str | None]:
    """Entries and the default name from a JSON or YAML registry file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise RegistryError(f"cannot read the model registry {path}: {err}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise RegistryError(f'{path}: expected {{"models": [{{"name", "source", "notes"}}, ...]}}')
    base = os.path.dirname(os.path.abspath(path))
    unknown = {key for m in models for key in m} - set(FIELDS)
    if unknown:
        raise RegistryError(f"{path}: unknown model fields {sorted(unknown)}; accepted: {', '.join(FIELDS)}")
    entries = [
        entry(
            m.get("name"),
            m.get("source"),
            m.get("notes", ""),
            m.get("dtype"),
            base,
            m.get("tokenizer"),
            m.get("mask_decoder"),
            m.get("tasks"),
        )
        for m in models
    ]
    return entries, data.get("default")


def read_env(value: str) -> list[ModelEntry]:
    """Entries from `name=source,source,...`."""
    entries = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, source = item.partition("=")
        entries.append(entry(name, source) if sep else entry(item, item))
    return entries


def build(demo_folder: str, file: str | None = None, env: str | None = None) -> Registry:
    """The demo first, then the file's models, then the environment's; names must be unique."""
    entries = [demo_entry(demo_folder)]
    default = DEMO_NAME
    if file:
        from_file, file_default = read_file(file)
        entries += from_file
        default = file_default or default
    if env:
        entries += read_env(env)
    by_name: dict[str, ModelEntry] = {}
    for item in entries:
        if item.name in by_name:
            raise RegistryError(f"two models are named {item.name!r}; names must be unique")
        by_name[item.name] = item
    if default not in by_name:
        raise RegistryError(f"the default model {default!r} is not among: {', '.join(by_name)}")
    return Registry(by_name, default)

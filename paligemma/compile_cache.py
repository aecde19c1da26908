"""JAX's persistent compilation cache, on by default in a user cache folder.

Compiling prefill + decode for a 3B model takes tens of seconds on CPU; with the executables kept on
disk, a restarted app (or CLI call) answers its first request almost as fast as a warm one.

    PALIGEMMA_COMPILE_CACHE unset          ->  $XDG_CACHE_HOME/paligemma/jax (default ~/.cache/paligemma/jax)
    PALIGEMMA_COMPILE_CACHE=/some/folder   ->  that folder
    PALIGEMMA_COMPILE_CACHE=off (or 0)     ->  no persistent cache

A cache folder the user already gave JAX itself (JAX_COMPILATION_CACHE_DIR, jax.config) is left alone.
The cache is trusted code: keep it in a folder only you can write to.
"""

from __future__ import annotations

import os

import jax

ENV = "PALIGEMMA_COMPILE_CACHE"
_OFF = {"", "0", "off", "false", "no"}
# Cache every compilation, the small ones of loading and preprocessing too: on the demo model, caching only those
# over 0.2 s left a restarted process's first request at 2.9 s and its load at 1.5 s; caching all, 1.3 s and
# 0.5 s (what remains is tracing, which JAX does before it can look an executable up).
MIN_COMPILE_S = 0.0
MAX_CACHE_BYTES = 4 * 2**30  # least recently used entries are evicted past this
_JAX_DEFAULT_MIN_COMPILE_S = 1.0


def cache_dir() -> str | None:
    """The folder the environment asks for, or None when the cache is switched off."""
    value = os.environ.get(ENV)
    if value is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "paligemma", "jax")
    return None if value.strip().lower() in _OFF else os.path.abspath(os.path.expanduser(value))


def enable() -> str | None:
    """Points JAX's persistent cache at `cache_dir()` unless JAX already has one; returns the folder in use.

    Idempotent, and effective even after other code compiled: JAX opens the cache at its first compilation
    that finds a folder set.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    folder = cache_dir()
    if folder is None:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:  # a read-only home must not stop the model from loading; it just compiles every time
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    if jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_DEFAULT_MIN_COMPILE_S:  # not set by the user
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    if jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    return folder

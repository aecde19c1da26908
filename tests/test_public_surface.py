"""The UI and its services use `paligemma` and `postprocess` through their top-level names only, and each shared
fact (dtype names, files that are not weights, the out-of-memory check) is defined once and used from there."""

import ast
import glob
import os
import shutil

import numpy as np
import pytest

import paligemma
import postprocess
from playground import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = [os.path.join(REPO, "app.py"), *sorted(glob.glob(os.path.join(REPO, "playground", "*.py")))]
PACKAGES = {"paligemma": paligemma, "postprocess": postprocess}


def _tree(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _imports(tree):
    """(module, name or None) for each import of one of PACKAGES or their modules."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names if alias.name.split(".")[0] in PACKAGES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            yield from ((node.module, alias.name) for alias in node.names)


@pytest.mark.parametrize("path", CLIENTS, ids=os.path.basename)
def test_the_ui_imports_only_the_packages_themselves(path):
    tree = _tree(path)
    for module, name in _imports(tree):
        assert module in PACKAGES, f"{path} imports {module}"
        assert name is None or name in PACKAGES[module].__all__, f"{path} imports {name} from {module}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in PACKAGES:
            assert node.attr in PACKAGES[node.value.id].__all__, f"{path} uses {node.value.id}.{node.attr}"


@pytest.mark.parametrize("package", PACKAGES.values(), ids=PACKAGES)
def test_every_public_name_exists(package):
    assert [name for name in package.__all__ if not hasattr(package, name)] == []
    assert len(set(package.__all__)) == len(package.__all__)


def test_the_loc_and_seg_counts_are_defined_once_in_the_tokenizer():
    counts = {"NUM_LOC", "NUM_SEG", "SEG_TOKENS_PER_MASK", "NUM_LOC_BINS", "NUM_SEG_CODES"}
    for path in glob.glob(os.path.join(REPO, "postprocess", "*.py")):
        assigned = {
            target.id
            for node in ast.walk(_tree(path))
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        assert not assigned & counts, f"{path} defines {assigned & counts}"
    assert (paligemma.NUM_LOC, paligemma.NUM_SEG, paligemma.SEG_TOKENS_PER_MASK) == (1024, 128, 16)


def test_a_folders_size_counts_only_its_weights(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for name in paligemma.NOT_WEIGHTS:
        np.savez(folder / name, w=np.zeros(5000, np.float32))
    assert paligemma.MASK_DECODER_NAME in paligemma.NOT_WEIGHTS and "vqvae-encoder.npz" in paligemma.NOT_WEIGHTS
    assert paligemma.requirements(str(folder)).download == os.path.getsize(folder / "model.npz")


def test_the_registry_accepts_the_dtypes_load_accepts(tmp_path):
    for name in paligemma.DTYPES:
        assert registry.entry("m", str(tmp_path), dtype=name).dtype == name
    with pytest.raises(registry.RegistryError, match="unknown dtype 'float64'; accepted: ") as refused:
        registry.entry("m", str(tmp_path), dtype="float64")
    assert all(name in str(refused.value) for name in paligemma.DTYPES)  # the accepted names come from paligemma


@pytest.mark.parametrize(
    "err, out_of_memory",
    [
        (MemoryError(), True),
        (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB"), True),
        (ValueError("the prompt is too long"), False),
    ],
)
def test_one_out_of_memory_check(err, out_of_memory):
    assert paligemma.is_out_of_memory(err) is out_of_memory

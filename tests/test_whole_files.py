"""A file written whole: the old one stays until the new one is complete, and a failed write leaves nothing behind."""

import pytest

from paligemma.whole_files import written_whole


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), written_whole(str(path)) as f:
        f.write(b"half")
        assert path.read_bytes() == b"old"  # readers meanwhile see the old file
        raise RuntimeError("killed mid-save")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]

    with written_whole(str(path)) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]

"""megalong.atomic: the output-directory rule and all-or-nothing directory and file writes."""

import os

import pytest

from megalong.atomic import atomic_directory, atomic_file, check_out_dir
from megalong.errors import MegalongError


def test_check_out_dir(tmp_path):
    check_out_dir(str(tmp_path / "absent"))
    check_out_dir(str(tmp_path))  # empty
    (tmp_path / "f").write_text("x")
    with pytest.raises(MegalongError, match="exists and is not empty; pass --overwrite"):
        check_out_dir(str(tmp_path))
    check_out_dir(str(tmp_path), overwrite=True)
    with pytest.raises(MegalongError, match="PEFT adapter directory .* is not a directory"):
        check_out_dir(str(tmp_path / "f"), overwrite=True, what="PEFT adapter directory")


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    out = tmp_path / "sub" / "out"
    with atomic_directory(str(out)) as staging:
        (open(os.path.join(staging, "a"), "w")).close()
    assert os.listdir(out) == ["a"]
    with pytest.raises(RuntimeError):
        with atomic_directory(str(out), overwrite=True) as staging:
            (open(os.path.join(staging, "b"), "w")).close()
            raise RuntimeError("boom")
    assert os.listdir(out) == ["a"]  # the old directory stays, the staging one is gone
    assert sorted(os.listdir(out.parent)) == ["out"]
    with atomic_directory(str(out), overwrite=True) as staging:
        (open(os.path.join(staging, "b"), "w")).close()
    assert os.listdir(out) == ["b"] and sorted(os.listdir(out.parent)) == ["out"]


def test_atomic_file(tmp_path):
    path = tmp_path / "x.txt"
    with atomic_file(str(path)) as staging, open(staging, "w") as handle:
        handle.write("one")
    with pytest.raises(RuntimeError):
        with atomic_file(str(path)) as staging, open(staging, "w") as handle:
            handle.write("two")
            raise RuntimeError("boom")
    assert path.read_text() == "one" and os.listdir(tmp_path) == ["x.txt"]

"""Writes that appear whole or not at all (torch-free): the output-directory check, a directory
staged beside its final place and renamed into it, and a file staged under a sibling name."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from megalong.errors import MegalongError


def check_out_dir(out: str, overwrite: bool = False, what: str = "output directory") -> None:
    """`out` may be written: absent, an empty directory, or a directory `overwrite` replaces."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise MegalongError(f"{what} {out} exists and is not a directory")
    if os.listdir(out) and not overwrite:
        raise MegalongError(f"{what} {out} exists and is not empty; pass --overwrite")


def staging_dir(out: str) -> str:
    """A new, empty, hidden sibling of `out` (its parent created), to be moved into place."""
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)


def move_into_place(staging: str, out: str) -> None:
    """Rename `staging` to `out`; an existing `out` is replaced only once `staging` is complete
    (it is renamed aside first and put back if the rename fails)."""
    out = os.path.abspath(os.fspath(out))
    if not os.path.exists(out):
        os.rename(staging, out)
        return
    if not os.listdir(out):
        os.rmdir(out)
        os.rename(staging, out)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: str, *, overwrite: bool = False,
                     what: str = "output directory") -> Iterator[str]:
    """Checks `out` (check_out_dir), yields a staging directory beside it, and moves that into
    place when the block succeeds; on any error (or interrupt) the staging directory is removed
    and `out` is as it was."""
    check_out_dir(out, overwrite, what)
    staging = staging_dir(out)
    try:
        yield staging
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def staging_path(path: str, suffix: str = "") -> str:
    """A sibling temp name for the file `path` (`suffix` keeps an extension a writer needs),
    renamed into place with os.replace once complete."""
    return f"{path}.tmp-{os.getpid()}{suffix}"


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a staging name for the file `path`, renamed into place when the block succeeds and
    removed otherwise."""
    staging = staging_path(path, suffix)
    try:
        yield staging
        os.replace(staging, path)
    finally:
        remove_quietly(staging)


def remove_quietly(*paths: str) -> None:
    for path in paths:
        try:
            os.remove(path)
        except OSError:
            pass

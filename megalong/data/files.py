"""Small file-system checks shared by the data tools (torch-free). Atomic writes are
`megalong.atomic`'s."""

import glob
import os

from megalong.errors import MegalongError


def expand_inputs(patterns: list[str], what: str = "input") -> list[str]:
    """Files named by paths or globs, in the order given (each glob sorted). A pattern that
    matches nothing, a directory, or an unreadable file is an error naming it."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise MegalongError(f"{what} {pattern!r} matches no files")
        for path in matches:
            if os.path.isdir(path):
                raise MegalongError(f"{what} {path} is a directory; name its files (a glob such as "
                                    f"'{os.path.join(path, '*.txt')}')")
            if not os.path.isfile(path):
                raise MegalongError(f"{what} {path} does not exist")
            if not os.access(path, os.R_OK):
                raise MegalongError(f"{what} {path} is not readable")
            files.append(path)
    if not files:
        raise MegalongError(f"no {what} files given")
    return files


def nearest_existing_dir(path: str) -> str:
    directory = os.path.abspath(path)
    while not os.path.isdir(directory):
        parent = os.path.dirname(directory)
        if parent == directory or (os.path.exists(directory) and not os.path.isdir(directory)):
            break
        directory = parent
    return directory


def check_writable_dir(directory: str, what: str = "output directory") -> None:
    """`directory` exists and is writable, or can be created (its nearest existing ancestor is a
    writable directory)."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise MegalongError(f"{what} {directory} is a file, not a directory")
    existing = nearest_existing_dir(directory)
    if not os.path.isdir(existing):
        raise MegalongError(f"{what} {directory} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MegalongError(f"{what} {directory} is not writable ({existing} denies writing)")


def make_dirs(directory: str) -> list[str]:
    """os.makedirs, returning the directories it created (deepest last) so a failed run can
    remove exactly those again with remove_created_dirs."""
    created = []
    directory = os.path.abspath(directory)
    while not os.path.isdir(directory):
        created.append(directory)
        directory = os.path.dirname(directory)
    created.reverse()
    for path in created:
        os.mkdir(path)
    return created


def remove_created_dirs(created: list[str]) -> None:
    for path in reversed(created):
        try:
            os.rmdir(path)
        except OSError:
            return

"""Checkpoint integrity (torch-free): a manifest of every file's size and CRC-32 inside each
iteration directory, checked before a checkpoint is used.

    ROOT/iter_0000100/manifest.json   {"format": 1, "files": {"__0_0.distcp": {"size", "crc32"}}}

The manifest is the last file written before iter_N.tmp is renamed to iter_N, so it also marks
the directory as complete. A checkpoint is checked two ways:
- `quick`: every listed file exists with its recorded size (stat only; CLIs run it before torch);
- deep: the CRC-32 of every byte as well (load_checkpoint, the files split over the ranks).
A damaged checkpoint is an error naming the file; `--load-fallback` tries older iterations
(newest first) until one is intact. Checkpoints written before manifests existed load unchecked.
"""

import json
import os
import re
import zlib

from megalong.atomic import atomic_file
from megalong.config.checkpoint import iteration_dir, latest_iteration
from megalong.errors import MegalongError


MANIFEST = "manifest.json"
_CHUNK = 16 << 20
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")


def list_files(directory: str) -> list[str]:
    """Every file under `directory` (relative paths, sorted), the manifest excluded."""
    found = []
    for parent, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), directory)
            if rel != MANIFEST and not rel.endswith(".manifest-tmp"):
                found.append(rel)
    return sorted(found)


def crc32_of(path: str) -> str:
    value = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value & 0xFFFFFFFF:08x}"


def file_entries(directory: str, names) -> dict:
    """{name: {"size", "crc32"}} of the given files of `directory`."""
    out = {}
    for name in names:
        path = os.path.join(directory, name)
        out[name] = {"size": os.path.getsize(path), "crc32": crc32_of(path)}
    return out


def write_manifest(directory: str, entries: dict) -> None:
    # the suffix keeps a crash's leftover out of list_files
    with atomic_file(os.path.join(directory, MANIFEST), suffix=".manifest-tmp") as tmp:
        with open(tmp, "w") as handle:
            json.dump({"format": 1, "files": dict(sorted(entries.items()))}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())


def read_manifest(directory: str):
    """The manifest's file table, or None for a checkpoint written before manifests."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            files = json.load(handle)["files"]
        if not isinstance(files, dict):
            raise ValueError("no file table")
        return files
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MegalongError(f"{path} is unreadable ({err}): the checkpoint is damaged") from None


def check_file(directory: str, name: str, entry: dict, deep: bool):
    """A one-line description of what is wrong with one file, or None."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != entry["size"]:
        kind = "truncated" if size < entry["size"] else "damaged"
        return f"{path} is {kind}: {size} bytes, the manifest records {entry['size']}"
    if deep and crc32_of(path) != entry["crc32"]:
        return f"{path} is corrupted: its CRC-32 differs from the one recorded when it was saved"
    return None


def check_checkpoint(directory: str, *, deep: bool, share=(0, 1)) -> list[str]:
    """Problems of one iteration directory (empty when intact). `share` = (rank, world): this
    caller checks every world-th listed file from rank on (the ranks split the reading)."""
    if not os.path.isdir(directory):
        return [f"checkpoint {directory} does not exist"]
    files = read_manifest(directory)
    if files is None:
        return []
    rank, world = share
    problems = []
    for name in sorted(files)[rank::world]:
        problem = check_file(directory, name, files[name], deep)
        if problem:
            problems.append(problem)
    return problems


def saved_iterations(root: str) -> list[int]:
    """Iterations with a (renamed, so once complete) directory under root, newest first."""
    if not os.path.isdir(root):
        return []
    found = [int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(root)) if m]
    return sorted(found, reverse=True)


def candidate_iterations(root: str, *, fallback: bool, start=None) -> list[int]:
    """The iteration to load (`start`, else the tracker's), then with `fallback` the older saved
    ones, newest first. Without a readable tracker, fallback uses every saved iteration."""
    if start is None:
        try:
            start = latest_iteration(root)
        except MegalongError:
            if not fallback or not saved_iterations(root):
                raise
            return saved_iterations(root)
    if not fallback:
        return [start]
    return [start] + [i for i in saved_iterations(root) if i < start]


def damaged_message(root: str, iteration: int, problems: list[str], hint: bool = True) -> str:
    more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
    older = [i for i in saved_iterations(root) if i < iteration]
    if not hint:
        hint = ""
    elif older:
        hint = (f"; iteration {older[0]} is the next older one (training with --load-fallback "
                "resumes from the newest intact older checkpoint)")
    else:
        hint = "; no older checkpoint is left to fall back to"
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        return f"checkpoint {directory} does not exist{hint}"
    return f"checkpoint {directory} is damaged: {problems[0]}{more}{hint}"


def select_iteration(root: str, *, fallback: bool = False, log=None) -> int:
    """The newest usable iteration by the quick check (sizes; torch-free, for CLIs): the
    tracker's, or with `fallback` the newest intact older one. Errors name the damaged file."""
    candidates = candidate_iterations(root, fallback=fallback)
    first_problem = None
    for iteration in candidates:
        problems = check_checkpoint(iteration_dir(root, iteration), deep=False)
        if not problems:
            if first_problem and log:
                log(first_problem + f"; falling back to iteration {iteration}")
            return iteration
        if not fallback:
            raise MegalongError(damaged_message(root, iteration, problems))
        first_problem = first_problem or f"{problems[0]}"
    raise MegalongError(f"no intact checkpoint in {root} (tried iterations "
                        f"{', '.join(map(str, candidates))}; first problem: {first_problem})")


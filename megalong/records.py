"""JSON files and record files (torch-free): one reader, whose errors name the file (and the
line or list index of a record).

A record file is a JSON list of records, a single JSON object, or JSON lines (one record per
line, blank lines skipped); its first non-blank character tells which."""

import json
from collections.abc import Iterator

from megalong.errors import MegalongError


_HEAD_CHARS = 4096


def read_json(path: str, missing: str | None = None):
    """The JSON document in `path`. A missing file raises `missing` (default "PATH does not
    exist"); an unreadable or invalid one "cannot read PATH: why"."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise MegalongError(missing or f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise MegalongError(f"cannot read {path}: {err}") from None


def read_json_object(path: str, what: str) -> dict:
    """A JSON object from `path` (`what` says what the file is for when it is missing)."""
    data = read_json(path, missing=f"{path} not found; {what}")
    if not isinstance(data, dict):
        raise MegalongError(f"{path} does not hold a JSON object")
    return data


def records_head(path: str) -> str:
    """The first characters of `path` without whitespace (cheap: for checks before heavy work)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return "".join(handle.read(_HEAD_CHARS).split())


def check_records_head(path: str, what: str, hint: str = "") -> None:
    """Cheap: `path` is not empty (nor an empty list) and starts like JSON or JSON lines. Every
    record is checked when the file is read."""
    head = records_head(path)
    if head in ("", "[]"):
        raise MegalongError(f"{what} {path} holds no records")
    if head[0] not in "[{":
        raise MegalongError(f"{what} {path} is not json or jsonl{hint}")


def iter_records(path: str) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of `path`: where is "PATH[i]" in a JSON list, "PATH:LINE"
    in JSON lines, "PATH" for a file holding one object. Invalid JSON raises "WHERE: invalid JSON
    (why)". JSON lines stream (the file is never held whole)."""
    with open(path, encoding="utf-8") as handle:
        head = handle.read(_HEAD_CHARS).lstrip()
        handle.seek(0)
        if head.startswith("["):
            try:
                records = json.load(handle)
            except ValueError as err:
                raise MegalongError(f"{path}: invalid JSON ({err})") from None
            for index, record in enumerate(records):
                yield f"{path}[{index}]", record
            return
        first = True
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                if first and line.lstrip().startswith("{"):  # perhaps one object over several lines
                    whole = _one_object(path)
                    if whole is not None:
                        yield path, whole
                        return
                raise MegalongError(f"{path}:{lineno}: invalid JSON ({err})") from None
            first = False
            yield f"{path}:{lineno}", record


def _one_object(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None

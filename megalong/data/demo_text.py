"""Text that exists on every machine with Python, for the CPU demo and the tests (torch-free).

Sources (deterministic order; contents follow the installed Python version):
- "topics": the reference-manual sections in `pydoc_data.topics` (what `help("if")` prints):
  79 documents, about 0.5 MB of English prose with code snippets;
- "docstrings": every docstring of the standard library's top-level modules, one document per
  module (English, a few MB);
- "stdlib": the standard library's top-level module sources, one document per file (about 4.7 MB;
  long documents whose later lines depend on names defined far earlier, which is what a
  long-context model can learn and a short-context one cannot).

    python -m megalong.data.demo_text OUT.jsonl [--source stdlib] [--max-mb 2]
"""

import argparse
import ast
import json
import os
import sys
import sysconfig
from collections.abc import Iterator

from megalong.atomic import atomic_file
from megalong.data.files import check_writable_dir, make_dirs
from megalong.errors import MegalongError, run_cli


SOURCES = ("topics", "docstrings", "stdlib")
# Not prose or not representative: rot13 text, an easter egg, frozen-module test stubs.
_SKIP_MODULES = {"this.py", "antigravity.py", "__phello__.foo.py"}


def _stdlib_files() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py") and n not in _SKIP_MODULES)
    return [os.path.join(stdlib, n) for n in names]


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def _module_docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = (ast.get_docstring(n, clean=True) for n in nodes)
    return "\n\n".join(d for d in docs if d)


def _documents(source: str) -> Iterator[str]:
    if source == "topics":
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield topics[name].strip() + "\n"
    elif source == "docstrings":
        for path in _stdlib_files():
            text = _module_docstrings(_read(path))
            if text:
                yield text + "\n"
    elif source == "stdlib":
        for path in _stdlib_files():
            text = _read(path)
            if text.strip():
                yield text
    else:
        raise MegalongError(f"unknown demo text source {source!r}; choose from {', '.join(SOURCES)}")


def demo_documents(source: str = "topics", max_bytes: int | None = None) -> Iterator[str]:
    """Documents of one source, stopping once `max_bytes` (UTF-8) have been yielded."""
    if source not in SOURCES:
        raise MegalongError(f"unknown demo text source {source!r}; choose from {', '.join(SOURCES)}")
    total = 0
    for text in _documents(source):
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(text.encode("utf-8"))
        yield text


def repeat_chunks(text: str, chars: int) -> str:
    """Each run of `chars` characters written twice ("ab" -> "aabb" for chars=1): a corpus where
    copying from about `chars` characters back pays, so a small model learns to retrieve (the
    attention-pattern ablation's copy-rich variant)."""
    return "".join(text[i:i + chars] * 2 for i in range(0, len(text), chars))


def write_demo_jsonl(path: str, source: str = "topics", max_bytes: int | None = None,
                     key: str = "text", repeat_chars: int = 0) -> tuple[int, int]:
    """Write the documents as jsonl ({key: text} per line), atomically, each through
    repeat_chunks when `repeat_chars` is given. Returns (documents, bytes of text)."""
    check_writable_dir(os.path.dirname(os.path.abspath(path)))
    make_dirs(os.path.dirname(os.path.abspath(path)))
    count = size = 0
    with atomic_file(path) as staging, open(staging, "w", encoding="utf-8") as handle:
        for text in demo_documents(source, max_bytes):
            text = repeat_chunks(text, repeat_chars) if repeat_chars else text
            handle.write(json.dumps({key: text}, ensure_ascii=False) + "\n")
            count += 1
            size += len(text.encode("utf-8"))
    return count, size


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo corpus as jsonl.")
    parser.add_argument("out", help="jsonl file to write")
    parser.add_argument("--source", choices=SOURCES, default="topics")
    parser.add_argument("--max-mb", type=float, default=None, help="stop after this many MB of text")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--repeat-chunks", type=int, default=0, metavar="CHARS",
                        help="write every CHARS characters of each document twice (a corpus "
                             "where copying pays)")
    args = parser.parse_args(argv)
    if args.repeat_chunks < 0:
        raise MegalongError(f"--repeat-chunks must be >= 0, got {args.repeat_chunks}")
    max_bytes = None if args.max_mb is None else int(args.max_mb * 1e6)
    count, size = write_demo_jsonl(args.out, args.source, max_bytes, args.json_key,
                                   args.repeat_chunks)
    print(f"wrote {count} documents ({size / 1e6:.2f} MB) to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cli(main))

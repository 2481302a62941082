"""Where training text comes from: user files/folders, or the embedded default corpus.

The embedded default needs no download: the Python standard library's own ``.py`` sources on this
machine (``sysconfig.get_paths()["stdlib"]``, ``site-packages`` and caches excluded), real code with
English docstrings, tens of MB. Files are listed in sorted order and split into train / validation
**by file**: a file is held out when ``sha256(seed:relative path)`` falls under ``val_fraction``,
so the split does not depend on the listing order and a validation file never feeds training.

Documents: a ``.jsonl`` line is one document (its ``text_field``), any other file is one document.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".c", ".h", ".js", ".ts", ".html", ".tex")
STDLIB = "stdlib"


@dataclass(frozen=True)
class CorpusFile:
    """One source file and the name used to hash it into a split (path relative to its root)."""

    path: Path
    rel: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[CorpusFile]:
    """The default corpus: every ``.py`` under the stdlib, sorted, without site-packages/caches."""
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library sources are not at {root}; pass --data PATH")
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        if "site-packages" in parts or "__pycache__" in parts or "dist-packages" in parts:
            continue
        if not p.is_file():
            continue
        out.append(CorpusFile(p, rel))
    if not out:
        raise FileNotFoundError(f"no .py files found under {root}; pass --data PATH")
    return out


def list_files(paths: list[str] | tuple[str, ...] | str) -> list[CorpusFile]:
    """Expand files and folders (recursively, text suffixes only) into a sorted, de-duplicated list.

    ``"stdlib"`` (alone or in the list) is the embedded default corpus.

    Raises:
        FileNotFoundError: a path does not exist, or a folder holds no text files.
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError("data: no corpus paths given (use 'stdlib' for the embedded default)")
    seen: dict[str, CorpusFile] = {}
    for spec in paths:
        if spec == STDLIB:
            for f in stdlib_files():
                seen.setdefault(f"stdlib:{f.rel}", CorpusFile(f.path, f"stdlib:{f.rel}"))
            continue
        p = Path(spec)
        if p.is_file():
            seen.setdefault(str(p.resolve()), CorpusFile(p, p.name))
        elif p.is_dir():
            found = [q for q in sorted(p.rglob("*")) if q.is_file() and q.suffix.lower() in TEXT_SUFFIXES]
            if not found:
                raise FileNotFoundError(f"data folder {p} holds no text files ({', '.join(TEXT_SUFFIXES)})")
            for q in found:
                seen.setdefault(str(q.resolve()), CorpusFile(q, q.relative_to(p).as_posix()))
        else:
            raise FileNotFoundError(f"data path not found: {spec}")
    return sorted(seen.values(), key=lambda f: f.rel)


def _hash_unit(seed: int, name: str) -> float:
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_files(files: list[CorpusFile], val_fraction: float, seed: int = 0) -> tuple[list[CorpusFile], list[CorpusFile]]:
    """Split by file with a hash of the relative name. Returns ``(train, validation)``, both sorted.

    With ``val_fraction > 0`` at least one file is held out and at least one kept for training,
    so a small corpus still gets a validation set (the file with the smallest hash goes there).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not files:
        raise ValueError("split_files: empty file list")
    if val_fraction > 0 and len(files) < 2:
        raise ValueError(
            f"a validation split needs at least 2 files, got 1 ({files[0].path}); pass --val-data or --val-fraction 0"
        )
    files = sorted(files, key=lambda f: f.rel)
    scored = [(_hash_unit(seed, f.rel), f) for f in files]
    val = [f for u, f in scored if u < val_fraction]
    if val_fraction > 0 and not val:
        val = [min(scored, key=lambda x: x[0])[1]]
    val_names = {f.rel for f in val}
    train = [f for f in files if f.rel not in val_names]
    if not train:
        raise ValueError(f"val_fraction={val_fraction} left no training files out of {len(files)}")
    return train, val


def iter_documents(f: CorpusFile, text_field: str = "text") -> Iterator[str]:
    """Documents of one file, in file order (a JSONL line each, or the whole file)."""
    if f.path.suffix.lower() == ".jsonl":
        with open(f.path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{f.path}:{lineno}: not valid JSON ({exc.msg})") from exc
                text = obj.get(text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{f.path}:{lineno}: expected an object with a string field {text_field!r}")
                yield text
    else:
        with open(f.path, encoding="utf-8", errors="replace") as fh:
            yield fh.read()


def corpus_bytes(files: list[CorpusFile]) -> int:
    return sum(os.path.getsize(f.path) for f in files)

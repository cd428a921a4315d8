"""Split names and split lists, shared by every reader.

A reader's `split` is a split name ("train", "validation" or "val", "test"), a list of them, or "all" (also None):
every sample found, whether or not a split list names it — the choice for data that ships no split lists (the
BigEarthNet v1 examples). Split lists are text files with one sample per line (.txt) or a CSV whose first column
names the sample (an optional header is skipped); either may be compressed (.bz2, .gz, .xz), as BigEarthNet's own
tools ship them (`train.csv.bz2`).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mmfuse_fast.errors import DataError, DataFileError

__all__ = ["SPLITS", "ALL", "SPLIT_FILE_NAMES", "canonical_split", "selects_all", "resolve_splits",
           "read_split_rows", "read_split_list", "find_split_files", "find_list_file", "select_split"]

SPLITS = ("train", "validation", "test")
ALL = "all"
SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}

# split list file names looked for in a dataset root, in this order; each also compressed
SPLIT_FILE_NAMES = {"train": ("train_files.csv", "train.csv", "train.txt"),
                    "validation": ("validation_files.csv", "val_files.csv", "validation.csv", "val.csv",
                                   "validation.txt", "val.txt"),
                    "test": ("test_files.csv", "test.csv", "test.txt")}
_OPENERS = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}
_HEADER_WORDS = {"image", "name", "id", "file", "filename", "tile", "patch", "patch_id", "patch_name", "sample",
                 "s1", "s2", "s1_name", "s2_name", "s1_patch", "s2_patch"}


def canonical_split(name, where: str) -> str:
    """The canonical name of split `name` ("val" -> "validation"); a DataError naming it, `where` it was asked
    for (a dataset root, a split_files option) and the valid splits otherwise."""
    if name not in SPLIT_ALIASES:
        raise DataError(f"unknown split {name!r} ({where}); valid splits: train, validation (or val), test, or "
                        f"{ALL!r} for every sample")
    return SPLIT_ALIASES[name]


def selects_all(split: str | Sequence[str] | None) -> bool:
    """True for a split selection that means every sample: None, "all", or a list holding "all"."""
    if split is None or split == ALL:
        return True
    return not isinstance(split, str) and ALL in list(split)


def resolve_splits(split: str | Sequence[str] | None, root: str | os.PathLike = "?") -> tuple[str, ...]:
    """Canonical split names, each once; every split for a selection of all samples (`selects_all`). Unknown
    names raise a DataError naming `root`."""
    if selects_all(split):
        return SPLITS
    names = (split,) if isinstance(split, str) else tuple(split)
    resolved = []
    for name in names:
        name = canonical_split(name, f"dataset at {root}")
        if name not in resolved:
            resolved.append(name)
    if not resolved:
        raise DataError(f"empty split list for the dataset at {root}")
    return tuple(resolved)


def _open_text(path: Path):
    opener = _OPENERS.get(path.suffix.lower())
    if opener is None:
        return open(path, newline="", encoding="utf-8")
    return io.TextIOWrapper(opener(path, "rb"), newline="", encoding="utf-8")


def read_split_rows(path: str | os.PathLike) -> list[list[str]]:
    """The rows of a split list (cells stripped, empty lines and a header row left out)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    try:
        with _open_text(path) as handle:
            rows = [[cell.strip() for cell in row] for row in csv.reader(handle) if row and row[0].strip()]
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError, csv.Error) as error:
        raise DataFileError(f"{path}: unreadable split list ({error})") from None
    if rows and rows[0][0].lower() in _HEADER_WORDS:
        rows = rows[1:]
    return rows


def entry_stem(cell: str) -> str:
    """A sample name from a split list cell: the file name without a .tif suffix (a path or a bare name)."""
    name = Path(cell.strip()).name
    return name.rsplit(".", 1)[0] if name.lower().endswith((".tif", ".tiff")) else name


def read_split_list(path: str | os.PathLike) -> list[str]:
    """The sample names of a split list (its first column, as file stems)."""
    return [entry_stem(row[0]) for row in read_split_rows(path)]


def find_split_files(root: Path, split_files: Mapping[str, str | os.PathLike] | None) -> dict[str, Path]:
    """{split: list file}: those given (`split_files`, keys are split names) and, for the other splits, the first
    of `SPLIT_FILE_NAMES` (or its compressed form) found in `root`."""
    found = {}
    for name, path in (split_files or {}).items():
        found[canonical_split(name, "in split_files")] = Path(path)
    for name, candidates in SPLIT_FILE_NAMES.items():
        if name in found:
            continue
        path = next((p for p in (find_list_file(root, c) for c in candidates) if p is not None), None)
        if path is not None:
            found[name] = path
    return found


def find_list_file(folder: Path, name: str) -> Path | None:
    """`folder/name`, or its compressed form (`name.bz2`, `.gz`, `.xz`), whichever exists first; else None."""
    return next((folder / (name + suffix) for suffix in ("", *_OPENERS) if (folder / (name + suffix)).is_file()),
                None)


def missing_split_list_error(name: str, root: Path) -> FileNotFoundError:
    return FileNotFoundError(f"no split list for split {name!r} in {root} (looked for "
                             f"{', '.join(SPLIT_FILE_NAMES[name])}, also .bz2/.gz/.xz); pass "
                             f"split_files={{{name!r}: path}}, or split {ALL!r} for every sample")


def select_split(ids: Sequence[str], root: Path, split, split_files,
                 key: Callable[[str], str] | None = None) -> tuple[list[str], dict[str, str | None]]:
    """(selected ids, id -> split name or None). Every id for a selection of all samples; else the ids the split
    lists name, in list order. An id listed but not found, or a selection of no sample, is a DataError."""
    files = find_split_files(root, split_files)
    key = key or (lambda name: name)
    listed = {name: [key(stem) for stem in read_split_list(path)] for name, path in files.items()}
    split_of: dict[str, str | None] = {}
    for name, stems in listed.items():
        for stem in stems:
            split_of.setdefault(stem, name)
    if selects_all(split):
        return list(ids), {i: split_of.get(i) for i in ids}
    known = set(ids)
    selected: dict[str, None] = {}
    for name in resolve_splits(split, root):
        if name not in files:
            raise missing_split_list_error(name, root)
        for stem in listed[name]:
            if stem not in known:
                raise DataFileError(f"sample {stem} (listed in {files[name]}) has no files under {root}")
            selected.setdefault(stem)
    if not selected:
        lists = ", ".join(str(files[name]) for name in resolve_splits(split, root))
        raise DataError(f"split {split!r} selects no sample of the dataset at {root} (empty split lists: {lists})")
    return list(selected), {i: split_of.get(i) for i in selected}

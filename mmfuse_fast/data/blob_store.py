"""The one reader of LMDB folders of safetensors blobs: BigEarthNet v2's LMDB (one blob per patch and sensor) and the
packs `mmfuse data pack` writes (one blob per sample). Blobs are read as read-only views of the memory map, so a
reader copies each array once, where it wants it (its own memory, or a row of the loader's batch buffer)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mmfuse_fast.errors import DataError, DataFileError

__all__ = ["BlobStore", "find_lmdb_dir", "shared_lmdb_env", "blob_views", "blob_arrays", "copy_views"]


def find_lmdb_dir(root: Path) -> Path:
    """The folder under `root` (or `root` itself) holding the LMDB `data.mdb`."""
    if (root / "data.mdb").is_file():
        return root
    candidates = sorted(p.parent for p in root.glob("*/data.mdb"))
    if not candidates:
        raise FileNotFoundError(f"no LMDB found: neither {root}/data.mdb nor {root}/*/data.mdb exists")
    preferred = [c for c in candidates if c.name == "BigEarthNet-V2-LMDB"]
    if len(candidates) > 1 and not preferred:
        raise FileNotFoundError(f"several LMDB folders under {root}: {[str(c) for c in candidates]}; pass one root")
    return (preferred or candidates)[0]


# py-lmdb refuses to open one environment twice in a process (LMDB's locks are per process and file), so every
# dataset reading the same LMDB in a process shares one read-only handle. A handle inherited through fork() (a
# DataLoader worker) is closed in the child and reopened: LMDB handles must not be used across fork().
_LMDB_ENVS: dict[str, tuple[int, tuple[int, int], object]] = {}


def shared_lmdb_env(path: str | os.PathLike):
    """This process's read-only handle on the LMDB folder `path` (opened on first use)."""
    import lmdb

    key = str(Path(path).resolve())
    data_file = os.stat(Path(key) / "data.mdb")
    file_id = (data_file.st_dev, data_file.st_ino)
    cached = _LMDB_ENVS.get(key)
    if cached is not None:
        pid, cached_file_id, env = cached
        if pid == os.getpid() and cached_file_id == file_id:
            return env
        env.close()  # inherited from the parent process, or the files were replaced
    env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
    _LMDB_ENVS[key] = (os.getpid(), file_id, env)
    return env


_NUMPY_OF_SAFETENSORS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                         "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                         "U16": np.uint16, "U32": np.uint32, "BOOL": np.bool_}
_LAYOUTS: dict[bytes, dict[str, tuple]] = {}  # header bytes -> parsed header: the samples of a pack share a few


def blob_views(blob) -> dict[str, tuple[np.ndarray, bool]]:
    """{name: (read-only array viewing `blob`, whether it holds bfloat16 bits as uint16)} of a safetensors blob (a
    buffer, e.g. an LMDB memory map: the views are valid while it is). Raises ValueError for another blob."""
    size = len(blob)
    header_size = int.from_bytes(bytes(blob[:8]), "little")
    if not 2 <= header_size <= size - 8:
        raise ValueError(f"header size {header_size} does not fit a blob of {size} bytes")
    header_bytes = bytes(blob[8: 8 + header_size])
    layout = _LAYOUTS.get(header_bytes)
    if layout is None:
        layout = {}
        for name, spec in json.loads(header_bytes).items():
            if name == "__metadata__":
                continue
            dtype, shape = np.dtype(_NUMPY_OF_SAFETENSORS[spec["dtype"]]), tuple(spec["shape"])
            start, end = spec["data_offsets"]
            if end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {name!r}: offsets {start}..{end} do not fit its shape {shape}")
            layout[name] = (dtype, shape, 8 + header_size + start, 8 + header_size + end, spec["dtype"] == "BF16")
        if len(_LAYOUTS) < 64:
            _LAYOUTS[header_bytes] = layout
    views = {}
    for name, (dtype, shape, start, end, bf16) in layout.items():
        if end > size:
            raise ValueError(f"tensor {name!r} ends at byte {end} of a blob of {size}")
        views[name] = (np.frombuffer(blob, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape), bf16)
    return views


def blob_arrays(blob, select: Mapping[str, Sequence[int] | None] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors blob, each copied once into its own memory.

    `select`: {name: channel indices along the first axis, or None for all}; other names are left out (default:
    every tensor, whole). Raises ValueError for a blob that is not safetensors or lacks a selected name."""
    return copy_views(blob_views(blob), select)


def copy_views(views: Mapping[str, tuple[np.ndarray, bool]], select: Mapping[str, Sequence[int] | None] | None
               ) -> dict[str, torch.Tensor]:
    """`blob_arrays` of the views `blob_views` gave."""
    missing = sorted(set(select or ()) - set(views))
    if missing:
        raise ValueError(f"no tensor {missing[0]!r} in the blob (it has {sorted(views)})")
    out = {}
    for name in views if select is None else select:
        view, bf16 = views[name]
        channels = None if select is None else select[name]
        tensor = torch.from_numpy(view.copy() if channels is None else view[channels])  # indexing copies too
        out[name] = tensor.view(torch.bfloat16) if bf16 else tensor
    return out


class BlobStore:
    """Read-only access to the safetensors blobs of the LMDB folder `path`, keyed by sample (or patch) name. Safe to
    pickle into DataLoader workers: each process opens its own handle on first use."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._env, self._env_pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_env": None, "_env_pid": None}

    @property
    def opened(self) -> bool:
        """Whether this process has opened the LMDB (readers open it on their first read, in each worker)."""
        return self._env is not None and self._env_pid == os.getpid()

    def _handle(self):
        if self._env is None or self._env_pid != os.getpid():
            self._env, self._env_pid = shared_lmdb_env(self.path), os.getpid()
        return self._env

    @contextlib.contextmanager
    def views(self, key: str, what: str, error: type[DataError] = DataFileError
              ) -> Iterator[dict[str, tuple[np.ndarray, bool]]]:
        """`blob_views` of blob `key`, valid inside the `with` block; a missing key or a blob that is not
        safetensors raises `error` naming `what` (the sample) and the LMDB folder."""
        with self._handle().begin(buffers=True) as txn:
            blob = txn.get(key.encode())
            if blob is None:
                raise error(f"{what}: key missing from the LMDB {self.path}")
            try:
                views = blob_views(blob)
            except (ValueError, KeyError, TypeError) as problem:
                raise error(f"{what}: corrupt LMDB value in {self.path}, not a safetensors blob ({problem})") from None
            yield views

    def arrays(self, key: str, what: str, error: type[DataError] = DataFileError,
               select: Mapping[str, Sequence[int] | None] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of blob `key` (`select` as in `copy_views`), each copied once out of the memory map."""
        with self.views(key, what, error) as views:
            try:
                return copy_views(views, select)
            except ValueError as problem:
                raise error(f"{what}: blob in {self.path} unusable ({problem})") from None

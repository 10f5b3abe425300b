"""Files on disk, one copy each: the cache root, atomic writes of files and folders, SHA-256, fsspec stores.

Every artefact rsae writes (checkpoints, activation caches, reports, the dequantised model, corpora,
compiled kernels) goes through `atomic_path`, `write_bytes_atomic` or `atomic_folder`: a reader, or a
job killed halfway, sees the old version or the new one, never half of one. Every checksummed
artefact is verified in one vocabulary, `VERIFY_MODES`.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

Verify = Literal["sha256", "header", "none"]
VERIFY_MODES: tuple[str, ...] = ("sha256", "header", "none")
"""How a checksummed artefact is checked before use: `sha256` (sizes, file headers and content hashes),
`header` (sizes and file headers: shapes and dtypes), `none`."""


def check_verify(mode: str) -> Verify:
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify={mode!r} is not a verify mode; use one of {VERIFY_MODES}")
    return mode  # type: ignore[return-value]


def cache_dir() -> Path:
    """Root of everything rsae caches on disk: `$RSAE_CACHE_DIR`, else `~/.cache/rsae`."""
    return Path(os.environ.get("RSAE_CACHE_DIR") or Path.home() / ".cache" / "rsae").expanduser()


# --- hashing ----------------------------------------------------------------------------------


def sha256_stream(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(1 << 22):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a local file, read in 4 MiB chunks."""
    with open(path, "rb") as handle:
        return sha256_stream(handle)


# --- atomic writes ----------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `target` to write; on success it is synced and renamed onto `target`, on
    failure removed. Concurrent writers each get their own temporary file, and the last rename wins."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A staging folder beside `target` to fill; on success it replaces `target` (an old `target` is moved
    aside first and deleted only afterwards), on failure it is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.writing-", dir=target.parent))
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                _fsync_file(path)
        _fsync_dir(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a `.npy` file (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


# --- stores: local folders or any fsspec filesystem ---------------------------------------------


def normalize_url(url: str | os.PathLike[str]) -> str:
    """`file://` and plain paths become absolute local paths; other URLs pass through for fsspec."""
    url = os.fspath(url)
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


class StoreError(ValueError):
    """A store URL that cannot be opened; the message names it and the fix."""


class Store:
    """A folder of files behind a URL: the local filesystem, or any fsspec filesystem (`memory://`, `s3://`...)."""

    def __init__(self, url: str | os.PathLike[str]) -> None:
        self.url = normalize_url(url)
        self.local = "://" not in self.url
        self.fs: Any = None
        if not self.local:
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(self.url)
            except (ImportError, ValueError) as err:
                raise StoreError(f"cannot open {self.url!r} ({err}); install the fsspec backend for its "
                                 "protocol, or use a local path") from err
        else:
            self.root = self.url

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def makedirs(self) -> None:
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        else:
            self.fs.makedirs(self.root, exist_ok=True)

    def exists(self, name: str) -> bool:
        return os.path.exists(self.path(name)) if self.local else self.fs.exists(self.path(name))

    def size(self, name: str) -> int:
        return os.path.getsize(self.path(name)) if self.local else int(self.fs.size(self.path(name)))

    def read_bytes(self, name: str) -> bytes:
        if self.local:
            return Path(self.path(name)).read_bytes()
        return self.fs.cat_file(self.path(name))

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write-then-rename locally; one put on object stores, which are atomic per object."""
        if self.local:
            write_bytes_atomic(self.path(name), data)
        else:
            self.fs.pipe_file(self.path(name), data)

    def load_npy(self, name: str, mmap: bool = True) -> np.ndarray:
        if self.local:
            return np.load(self.path(name), mmap_mode="r" if mmap else None, allow_pickle=False)
        return np.load(io.BytesIO(self.read_bytes(name)), allow_pickle=False)

    def sha256(self, name: str) -> str:
        if self.local:
            return sha256_file(self.path(name))
        with self.fs.open(self.path(name), "rb") as handle:
            return sha256_stream(handle)

    def free_bytes(self) -> int | None:
        if not self.local:
            return None
        probe = Path(self.root)
        while not probe.exists():
            probe = probe.parent
        return shutil.disk_usage(probe).free

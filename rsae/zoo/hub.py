"""The zoo on the Hugging Face Hub: `load`, `pull`, `push` and `entries`, through `huggingface_hub`.

Downloads go into the standard HF cache and are verified against the card's sha256 before use (a file that
does not match is removed from the cache and refused); only safetensors weights are read. `load` looks in the
HF cache first, then asks the Hub, then falls back to the copy that ships with the source tree (verified the
same way), so published entries load on a machine with no network. `endpoint=` and `token=` reach every
`huggingface_hub` call, for a mirror or a private Hub. `huggingface_hub` is imported on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rsae._io import sha256_file
from rsae.nn.sae import SparseAutoencoder
from rsae.zoo import registry
from rsae.zoo.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from rsae.zoo.checkpoint import load as load_folder
from rsae.zoo.registry import Card, ZooError

LOADED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
"""What `load` needs of an entry's folder; `pull` fetches every file the card lists."""


def load(name: str, revision: str | None = None, device: str | torch.device = "cpu", endpoint: str | None = None,
         token: str | None = None, dtype: str | None = None) -> SparseAutoencoder:
    """The zoo entry `name` (`LM/LAYER/FAMILY`) as a ready model, hook point and LM name in its cfg; `dtype`
    (e.g. "float32") casts the stored parameters (the shipped entries store bfloat16)."""
    entry = _published(registry.card(name))
    folder = _cached(entry, revision, endpoint, LOADED_FILES)
    reason = None
    if folder is None:
        try:
            folder = _download(entry, revision, endpoint, token, LOADED_FILES)
        except ZooError as err:
            reason = err
            folder = _shipped(entry)
    if folder is None:
        raise ZooError(f"{name} is neither in the HF cache nor reachable on the Hub ({reason}), and ships no copy; "
                       "connect to the Hub (unset HF_HUB_OFFLINE) or `rsae zoo pull` it where the Hub is reachable")
    return load_folder(folder, device=device, dtype=dtype)


def pull(name: str, revision: str | None = None, endpoint: str | None = None, token: str | None = None) -> Path:
    """Download every file of the entry into the HF cache (verified) and return its folder there."""
    entry = _published(registry.card(name))
    files = tuple(entry.hub["files"])
    return _cached(entry, revision, endpoint, files) or _download(entry, revision, endpoint, token, files)


def entries() -> list[dict[str, Any]]:
    """One row per card: name, family, status, and the fine-tuned RSAE's L0 and explained variance (if measured)."""
    rows = []
    for entry_name in registry.names():
        entry = registry.card(entry_name)
        rsae_metrics = (entry.evaluation.get("table") or {}).get("rsae", {})
        rows.append({"name": entry.name, "family": entry.family, "l0": rsae_metrics.get("l0"),
                     "explained_variance": rsae_metrics.get("explained_variance"), "status": entry.status})
    return rows


def _published(entry: Card) -> Card:
    if entry.status == "recipe":
        raise ZooError(f"{entry.name} is a recipe: its weights are not published yet. Build them where the Hub is "
                       f"reachable with `{entry.build_command()}` (teacher {entry.teacher.get('source')}, LM "
                       f"{entry.lm.get('name')})")
    return entry


def _hub() -> Any:
    import huggingface_hub

    return huggingface_hub


def _cached(entry: Card, revision: str | None, endpoint: str | None, files: tuple[str, ...]) -> Path | None:
    """The entry's folder in the HF cache when every file is there (verified), else None; asks no server."""
    hub = _hub()
    try:
        paths = [_fetch(entry, file, revision, endpoint, local_files_only=True) for file in files]
    except (hub.errors.LocalEntryNotFoundError, hub.errors.EntryNotFoundError, OSError):
        return None
    return _verified(entry, paths)


def _fetch(entry: Card, file: str, revision: str | None, endpoint: str | None, **options: Any) -> Path:
    """One of the entry's files through `hf_hub_download`, at the card's revision unless another is asked for."""
    return Path(_hub().hf_hub_download(entry.hub["repo_id"], _in_repo(entry, file),
                                       revision=revision or entry.hub["revision"], endpoint=endpoint, **options))


def _download(entry: Card, revision: str | None, endpoint: str | None, token: str | None,
              files: tuple[str, ...]) -> Path:
    hub = _hub()
    where = f"{entry.hub['repo_id']}@{revision or entry.hub['revision']}"
    paths = []
    for file in files:
        try:
            paths.append(_fetch(entry, file, revision, endpoint, token=token))
        except hub.errors.RevisionNotFoundError as err:
            raise ZooError(f"{where}: no such revision on the Hub; drop --revision to use the card's "
                           f"({entry.hub['revision']})") from err
        except hub.errors.RepositoryNotFoundError as err:
            raise ZooError(f"{where}: the Hub has no such repository (or it is private: pass a token)") from err
        except (hub.errors.LocalEntryNotFoundError, hub.errors.OfflineModeIsEnabled) as err:
            # Before EntryNotFoundError, of which the client makes LocalEntryNotFoundError a subclass.
            raise ZooError(f"{where}: not in the HF cache, and the Hub is not reachable (HF_HUB_OFFLINE set, no "
                           "network, or the server down after the client's retries)") from err
        except hub.errors.EntryNotFoundError as err:
            raise ZooError(f"{where}: the Hub has no {_in_repo(entry, file)}") from err
        except (hub.errors.HfHubHTTPError, OSError) as err:
            raise ZooError(f"{where}: the Hub did not answer ({type(err).__name__}: {err})") from err
    return _verified(entry, paths)


def _shipped(entry: Card) -> Path | None:
    if entry.shipped is None:
        return None
    folder = registry.cards_root() / entry.shipped
    if not all((folder / file).is_file() for file in LOADED_FILES):
        raise ZooError(f"{entry.name}: the shipped copy {folder} is incomplete; reinstall rsae")
    return _verified(entry, [folder / file for file in LOADED_FILES], remove_bad=False)


def _in_repo(entry: Card, file: str) -> str:
    prefix = entry.hub.get("path_in_repo") or ""
    return f"{prefix.strip('/')}/{file}" if prefix else file


def _verified(entry: Card, paths: list[Path], remove_bad: bool = True) -> Path:
    """The folder of `paths` once each file matches the card's sha256; a file that does not is removed from the
    HF cache (its snapshot link and its blob) and refused."""
    expected = entry.hub["files"]
    for path in paths:
        if sha256_file(path) != expected.get(path.name):
            if remove_bad:
                blob = path.resolve()
                path.unlink(missing_ok=True)
                if blob != path:
                    blob.unlink(missing_ok=True)
            raise ZooError(f"{entry.name}: {path.name} does not match the sha256 in its card (corrupt or altered"
                           f"{'; removed from the HF cache' if remove_bad else ''}); pull it again or reinstall rsae")
    return paths[0].parent


# --- pushing ------------------------------------------------------------------------------------


def push(folder: str | os.PathLike[str], repo_id: str, path_in_repo: str = "", revision: str = "main",
         endpoint: str | None = None, token: str | None = None, commit_message: str | None = None,
         ) -> dict[str, Any]:
    """Upload an entry folder (`cfg.json`, `weights.safetensors`, `report.json`, plots, `README.md`) to
    `repo_id/path_in_repo`; a folder whose files the Hub already holds unchanged makes no commit.

    Returns {"commit": the new commit id or None for a no-op, "revision": the commit the files are at,
    "files": {name: sha256}}."""
    hub = _hub()
    folder = Path(folder)
    files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    if not {CONFIG_FILE, WEIGHTS_FILE} <= set(files):
        raise ZooError(f"{folder} is not an entry folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    token = token or hub.get_token()
    if not token:
        raise ZooError("pushing needs a Hub token with write access: pass --token, set HF_TOKEN, or `hf auth login`")
    api = hub.HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, exist_ok=True)
    try:
        head = api.repo_info(repo_id, revision=revision).sha
    except hub.errors.RevisionNotFoundError:
        head = None
    # The client itself skips files the Hub holds unchanged (their remote oids come back from preupload) and
    # makes no commit when nothing is left; the head then stays where it was.
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), path_in_repo=path_in_repo or None,
                             revision=revision, commit_message=commit_message or f"rsae: {path_in_repo or repo_id}")
    return {"commit": None if info.oid == head else info.oid, "revision": info.oid,
            "files": {name: sha256_file(path) for name, path in files.items()}}

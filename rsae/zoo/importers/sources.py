"""Where an SAE to import lives: a local path, a Hugging Face Hub path, or a SAELens release name."""

from __future__ import annotations

import re
from pathlib import Path

from rsae.zoo.importers.base import SAEImportError

HF_PREFIX, SAELENS_PREFIX = "hf:", "saelens:"


def parse_hf(spec: str) -> tuple[str, str | None, str | None]:
    """`REPO_ID[/PATH][@REVISION]` (REPO_ID is `owner/name`) to (repo_id, path or None, revision or None)."""
    body, _, revision = spec.partition("@")
    parts = body.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise SAEImportError(f"hf:{spec} is not hf:OWNER/NAME[/PATH][@REVISION]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None


def resolve(source: str, revision: str | None = None, endpoint: str | None = None, token: str | None = None,
            ) -> tuple[Path, str]:
    """(local file or folder holding the SAE, a description of where it came from)."""
    if source.startswith(HF_PREFIX):
        return _from_hub(*parse_hf(source[len(HF_PREFIX):]), revision, endpoint, token)
    if source.startswith(SAELENS_PREFIX):
        repo_id, path = _saelens_release(source[len(SAELENS_PREFIX):])
        return _from_hub(repo_id, path, None, revision, endpoint, token)
    path = Path(source).expanduser()
    if not path.exists():
        raise SAEImportError(f"{source} does not exist; pass a folder or file of an SAE, hf:OWNER/NAME[/PATH] or "
                             "saelens:RELEASE/SAE_ID")
    return path.resolve(), str(path.resolve())


def _from_hub(repo_id: str, path: str | None, spec_revision: str | None, revision: str | None, endpoint: str | None,
              token: str | None) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    revision = revision or spec_revision
    patterns = None if path is None else [path, f"{path}/*"]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, endpoint=endpoint,
                                        token=token))
    except LocalEntryNotFoundError as err:
        raise SAEImportError(f"hf:{repo_id}: not in the local Hugging Face cache and the Hub is not reachable "
                             f"(HF_HUB_OFFLINE set, or no network): {err}") from err
    except HfHubHTTPError as err:
        raise SAEImportError(f"hf:{repo_id}@{revision or 'main'}: the Hub refused the download ({err}); check the "
                             "repo id, the revision and your token (--token or HF_TOKEN)") from err
    target = folder / path if path else folder
    if not target.exists():
        raise SAEImportError(f"hf:{repo_id} has no {path!r} at revision {revision or 'main'}")
    where = f"hf:{repo_id}" + (f"/{path}" if path else "") + f"@{revision or 'main'}"
    return target, where


def _saelens_release(spec: str) -> tuple[str, str]:
    """(repo_id, path) of `RELEASE/SAE_ID` in SAELens' pretrained-SAE directory."""
    release, _, sae_id = spec.partition("/")
    if not release or not sae_id:
        raise SAEImportError(f"saelens:{spec} is not saelens:RELEASE/SAE_ID (e.g. saelens:gpt2-small-res-jb/"
                             "blocks.8.hook_resid_pre)")
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError as err:
        raise SAEImportError(
            f"saelens:{spec} needs SAELens' directory of releases: pip install sae-lens (in an environment of its "
            "own if its transformer-lens pin conflicts), or name the Hub files directly as hf:OWNER/NAME/PATH"
        ) from err
    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = [r for r in directory if re.sub(r"\W", "", release) in re.sub(r"\W", "", r)][:5]
        raise SAEImportError(f"unknown SAELens release {release!r}" + (f"; close: {', '.join(close)}" if close else ""))
    entry = directory[release]
    if sae_id not in entry.saes_map:
        raise SAEImportError(f"SAELens release {release!r} has no SAE {sae_id!r}; it has e.g. "
                             f"{', '.join(list(entry.saes_map)[:5])}")
    return entry.repo_id, entry.saes_map[sae_id]

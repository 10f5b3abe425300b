"""The real `huggingface_hub` client against `LocalHub`: pushes, listings, downloads, refs, errors, retries and
the cache, over HTTP on 127.0.0.1. These pin both the server and the client behaviour the model zoo relies on."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import huggingface_hub
import numpy as np
import pytest
from hub_server import LocalHub, git_oid, lfs_pointer, online
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import get_session
from huggingface_hub.utils.sha import git_hash
from safetensors.numpy import save_file

pytestmark = [
    pytest.mark.timeout(120),
    # huggingface_hub's LFS upload passes the file as `data=`, which httpx2 deprecates: the client's, not ours.
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"),
]

TOKEN = "hf_localhub_test_token"
REPO = "test-user/zoo"
LFS_THRESHOLD = 2048  # small, so that a 3 KiB text file takes the size rule of the LFS decision


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHub]:
    with LocalHub(token=TOKEN, lfs_threshold=LFS_THRESHOLD) as hub:
        online(monkeypatch, hub, tmp_path / "hf-home")
        yield hub
        assert hub.errors == []


@pytest.fixture
def api(hub: LocalHub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A checkpoint folder that covers each upload rule: regular text files, a safetensors file (LFS by
    .gitattributes), a small untracked binary file (LFS as binary) and a large text file (LFS by size)."""
    folder = tmp_path / "checkpoint"
    (folder / "extra").mkdir(parents=True)
    (folder / "logs").mkdir()
    (folder / "config.json").write_text(json.dumps({"d_in": 8, "d_sae": 32}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags: [sae]\n---\n# A tiny SAE\n")
    save_file({"W_enc": np.arange(8 * 32, dtype=np.float32).reshape(8, 32)}, folder / "model.safetensors")
    (folder / "extra" / "state.raw").write_bytes(b"\x00\x01binary\x00")
    (folder / "logs" / "train.txt").write_text("step loss\n" * 300)
    return folder


def push(api: HfApi, folder: Path, **kwargs: object) -> huggingface_hub.CommitInfo:
    api.create_repo(REPO, exist_ok=True)
    return api.upload_folder(repo_id=REPO, folder_path=folder, **kwargs)


def download(hub: LocalHub, filename: str, **kwargs: object) -> Path:
    return Path(hf_hub_download(REPO, filename, endpoint=hub.endpoint, token=TOKEN, **kwargs))


def storage() -> Path:
    """The client's cache folder for REPO."""
    return Path(constants.HF_HUB_CACHE) / "models--test-user--zoo"


def test_create_repo_starts_with_the_hubs_initial_commit(api: HfApi) -> None:
    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url.endpoint == api.endpoint

    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)
    assert conflict.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert api.create_repo("solo").repo_id == "test-user/solo"  # no namespace: the token's user

    [initial] = api.list_repo_commits(REPO)
    assert initial.title == "initial commit" and initial.authors == ["system"]
    assert re.fullmatch("[0-9a-f]{40}", initial.commit_id)
    assert api.model_info(REPO).sha == initial.commit_id
    assert api.list_repo_files(REPO) == [".gitattributes"]
    # The real Hub's default .gitattributes, byte for byte: git gives it this blob id on huggingface.co too.
    [gitattributes] = api.list_repo_tree(REPO)
    assert gitattributes.blob_id == "a6344aac8c09253b3b630fb776ae94478aa0275b"


def test_upload_folder_takes_the_regular_and_the_lfs_paths(hub: LocalHub, api: HfApi, folder: Path) -> None:
    api.create_repo(REPO)
    hub.requests.clear()
    commit = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="Add checkpoint")

    lfs_names = {"model.safetensors", "extra/state.raw", "logs/train.txt"}
    calls = [(method, path.split("/lfs-upload/")[0]) for method, path in hub.requests]
    assert calls[:4] == [
        # README.md metadata is checked before anything is uploaded: while collecting files, and by create_commit.
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/{REPO}.git/info/lfs/objects/batch"),
    ]
    assert calls.count(("PUT", "")) == calls.count(("POST", f"/{REPO}.git/info/lfs/objects/verify")) == 3
    assert calls[-1] == ("POST", f"/api/models/{REPO}/commit/main")
    assert len(commit.oid) == 40 and commit.oid == api.model_info(REPO).sha

    tree = {entry.path: entry for entry in api.list_repo_tree(REPO, recursive=True)}
    assert {path for path, entry in tree.items() if isinstance(entry, RepoFolder)} == {"extra", "logs"}
    for path in ("config.json", "README.md", "model.safetensors", "extra/state.raw", "logs/train.txt"):
        content = (folder / path).read_bytes()
        entry = tree[path]
        assert isinstance(entry, RepoFile) and entry.size == len(content)
        if path in lfs_names:
            sha256 = hashlib.sha256(content).hexdigest()
            assert entry.lfs is not None and entry.lfs.sha256 == sha256 and entry.lfs.size == len(content)
            assert entry.blob_id == git_oid("blob", lfs_pointer(sha256, len(content)))
        else:
            assert entry.lfs is None and entry.blob_id == git_hash(content)

    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", "config.json", "README.md", *lfs_names])
    root = {entry.path for entry in api.list_repo_tree(REPO)}
    assert root == {".gitattributes", "config.json", "README.md", "model.safetensors", "extra", "logs"}
    assert {entry.path for entry in api.list_repo_tree(REPO, path_in_repo="extra")} == {"extra/state.raw"}
    siblings = {sibling.rfilename: sibling for sibling in api.model_info(REPO, files_metadata=True).siblings}
    assert siblings["model.safetensors"].lfs.sha256 == tree["model.safetensors"].lfs.sha256
    assert siblings["config.json"].lfs is None and siblings["config.json"].blob_id == tree["config.json"].blob_id


def test_hf_hub_download_fills_the_cache_by_commit_and_etag(hub: LocalHub, api: HfApi, folder: Path) -> None:
    commit = push(api, folder).oid
    for name, etag in [
        ("config.json", git_hash((folder / "config.json").read_bytes())),  # regular file: git blob id
        ("model.safetensors", hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()),  # LFS
    ]:
        path = download(hub, name)
        assert path.read_bytes() == (folder / name).read_bytes()
        assert path == storage() / "snapshots" / commit / name
        assert path.resolve() == (storage() / "blobs" / etag).resolve()
    assert (storage() / "refs" / "main").read_text() == commit

    hub.requests.clear()
    assert download(hub, "config.json") == storage() / "snapshots" / commit / "config.json"
    assert hub.requests == [("HEAD", f"/{REPO}/resolve/main/config.json")]  # checked, not downloaded again
    hub.requests.clear()
    assert download(hub, "config.json", revision=commit).is_file()
    assert hub.requests == []  # a cached commit id needs no request at all


def test_resolve_answers_with_the_headers_the_client_reads(hub: LocalHub, api: HfApi, folder: Path) -> None:
    commit = push(api, folder).oid
    content = (folder / "model.safetensors").read_bytes()
    sha256 = hashlib.sha256(content).hexdigest()
    response = get_session().head(f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors")
    assert response.status_code == 200
    assert response.headers["X-Repo-Commit"] == commit
    assert response.headers["ETag"] == response.headers["X-Linked-Etag"] == f'"{sha256}"'
    assert response.headers["X-Linked-Size"] == response.headers["Content-Length"] == str(len(content))
    assert not [name for name in response.headers if name.lower().startswith("x-xet")]

    missing = get_session().head(f"{hub.endpoint}/{REPO}/resolve/main/nope.bin")
    assert missing.status_code == 404
    assert missing.headers["X-Error-Code"] == "EntryNotFound" and missing.headers["X-Repo-Commit"] == commit


def test_snapshot_download_with_allow_patterns(hub: LocalHub, api: HfApi, folder: Path) -> None:
    commit = push(api, folder).oid
    kwargs = {"endpoint": hub.endpoint, "token": TOKEN, "allow_patterns": ["*.json", "*.safetensors"]}
    snapshot = Path(snapshot_download(REPO, **kwargs))
    assert snapshot == storage() / "snapshots" / commit
    assert sorted(str(path.relative_to(snapshot)) for path in snapshot.rglob("*") if path.is_file()) == [
        "config.json",
        "model.safetensors",
    ]
    assert (snapshot / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()

    hub.requests.clear()
    assert Path(snapshot_download(REPO, **kwargs)) == snapshot
    # Resolving "main" is the only request: the tree listing and the files come from the cache.
    assert hub.requests == [("GET", f"/api/models/{REPO}/revision/main")]


def test_a_new_commit_moves_main_and_old_commits_stay_downloadable(hub: LocalHub, api: HfApi, folder: Path) -> None:
    first = push(api, folder).oid
    assert download(hub, "config.json").read_text() == json.dumps({"d_in": 8, "d_sae": 32})

    (folder / "config.json").write_text(json.dumps({"d_in": 8, "d_sae": 64}))
    second = push(api, folder, commit_message="Wider").oid
    assert second != first
    assert json.loads(download(hub, "config.json").read_text())["d_sae"] == 64
    assert (storage() / "refs" / "main").read_text() == second
    assert json.loads(download(hub, "config.json", revision=first).read_text())["d_sae"] == 32
    assert json.loads(download(hub, "config.json", revision=first[:7]).read_text())["d_sae"] == 32
    history = api.list_repo_commits(REPO)
    assert [c.commit_id for c in history[:2]] == [second, first] and history[0].title == "Wider"


def test_branches_and_tags_are_revisions(hub: LocalHub, api: HfApi, folder: Path) -> None:
    first = push(api, folder).oid
    branch = "exp/lr-1e-3"  # a "/" in a revision travels as %2F
    api.create_branch(REPO, branch=branch)
    api.upload_file(path_or_fileobj=b'{"d_sae": 128}', path_in_repo="config.json", repo_id=REPO, revision=branch)
    api.create_tag(REPO, tag="v1.0", revision=first)

    refs = api.list_repo_refs(REPO)
    assert {ref.name for ref in refs.branches} == {"main", branch}
    assert [(tag.name, tag.target_commit) for tag in refs.tags] == [("v1.0", first)]
    assert json.loads(download(hub, "config.json", revision=branch).read_text()) == {"d_sae": 128}
    assert json.loads(download(hub, "config.json", revision="v1.0").read_text())["d_sae"] == 32
    assert json.loads(download(hub, "config.json").read_text())["d_sae"] == 32
    assert (storage() / "refs" / branch).read_text() == api.list_repo_commits(REPO, revision=branch)[0].commit_id

    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_branch(REPO, branch=branch)
    assert conflict.value.response.status_code == 409
    api.create_branch(REPO, branch=branch, exist_ok=True)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_tag(REPO, tag="v1.0")
    assert conflict.value.response.status_code == 409

    api.delete_tag(REPO, tag="v1.0")
    api.delete_branch(REPO, branch=branch)
    assert api.list_repo_refs(REPO).tags == []
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v1.0")
    with pytest.raises(RevisionNotFoundError):
        download(hub, "config.json", revision=branch)  # even with the branch's files cached


def test_repushing_an_unchanged_folder_creates_no_commit(hub: LocalHub, api: HfApi, folder: Path) -> None:
    first = push(api, folder)
    hub.requests.clear()
    again = api.upload_folder(repo_id=REPO, folder_path=folder)

    assert again.oid == first.oid
    # The client compares the oids preupload returns; LFS objects are offered again but not sent (no PUT).
    assert hub.requests == [
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/{REPO}.git/info/lfs/objects/batch"),
        ("GET", f"/api/models/{REPO}/revision/main"),
    ]
    assert len(api.list_repo_commits(REPO)) == 2


def test_commit_operations_delete_and_copy(hub: LocalHub, api: HfApi, folder: Path) -> None:
    push(api, folder)
    api.create_commit(
        REPO,
        operations=[
            CommitOperationDelete("logs/"),
            CommitOperationDelete("README.md"),
            CommitOperationCopy("model.safetensors", "backup/model.safetensors"),  # LFS: copied by sha256
            CommitOperationCopy("config.json", "backup/config.json"),  # regular: downloaded and re-sent
            CommitOperationAdd("notes/empty.txt", b""),
        ],
        commit_message="Reorganize",
    )
    assert sorted(api.list_repo_files(REPO)) == [
        ".gitattributes",
        "backup/config.json",
        "backup/model.safetensors",
        "config.json",
        "extra/state.raw",
        "model.safetensors",
        "notes/empty.txt",
    ]
    assert download(hub, "backup/model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert download(hub, "notes/empty.txt").read_bytes() == b""

    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, operations=[CommitOperationDelete("nope.txt")], commit_message="Delete nothing")
    with pytest.raises(HfHubHTTPError) as moved:
        api.create_commit(
            REPO, operations=[CommitOperationAdd("x.txt", b"x")], commit_message="Stale", parent_commit="0" * 40
        )
    assert moved.value.response.status_code == 412


def test_missing_repo_revision_and_file_raise_the_clients_errors(hub: LocalHub, api: HfApi, folder: Path) -> None:
    push(api, folder)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test-user/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/nope", "config.json", endpoint=hub.endpoint)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        download(hub, "config.json", revision="nope")
    with pytest.raises(RemoteEntryNotFoundError) as missing:
        download(hub, "nope.bin")
    assert isinstance(missing.value, EntryNotFoundError)
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="nope"))
    assert api.file_exists(REPO, "config.json") and not api.file_exists(REPO, "nope.bin")
    assert api.repo_exists(REPO) and not api.repo_exists("test-user/nope")


def test_writes_need_the_token(hub: LocalHub, api: HfApi, folder: Path) -> None:
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(HfHubHTTPError) as unauthorized:
        anonymous.create_repo(REPO)
    assert unauthorized.value.response.status_code == 401
    assert not isinstance(unauthorized.value, RepositoryNotFoundError)  # that mapping is for https URLs only

    push(api, folder)
    with pytest.raises(HfHubHTTPError) as unauthorized:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert unauthorized.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as invalid:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").model_info(REPO)
    assert invalid.value.response.status_code == 401
    assert "Invalid credentials in Authorization header" in str(invalid.value)
    assert len(anonymous.list_repo_commits(REPO)) == 2  # public reads need no token; the write did not land

    api.create_repo("test-user/secret", private=True)
    assert api.model_info("test-user/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("test-user/secret")
    assert api.whoami()["name"] == "test-user"


def test_delete_repo(api: HfApi, folder: Path) -> None:
    push(api, folder)
    api.delete_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(REPO)
    api.delete_repo(REPO, missing_ok=True)
    assert push(api, folder).oid == api.model_info(REPO).sha  # the name can be used again


def test_server_errors_get_bounded_quick_retries(hub: LocalHub, api: HfApi, folder: Path) -> None:
    push(api, folder)
    cached = download(hub, "config.json")
    start = time.monotonic()

    hub.requests.clear()
    hub.fail_next(1)
    with pytest.raises(HfHubHTTPError) as unavailable:
        api.model_info(REPO)  # plain API calls are not retried
    assert unavailable.value.response.status_code == 503 and len(hub.requests) == 1

    hub.requests.clear()
    hub.fail_next(2)
    assert "config.json" in api.list_repo_files(REPO)  # listings retry with backoff and recover
    assert len(hub.requests) == 3

    hub.requests.clear()
    hub.fail_next(100)
    with pytest.raises(HfHubHTTPError) as unavailable:
        api.list_repo_files(REPO)
    assert unavailable.value.response.status_code == 503 and len(hub.requests) == 6  # 1 try + 5 retries

    hub.requests.clear()
    with pytest.raises(LocalEntryNotFoundError) as unavailable:
        download(hub, "README.md")  # not cached: one HEAD, then the same again with 5 retries
    assert isinstance(unavailable.value.__cause__, HfHubHTTPError) and len(hub.requests) == 7

    hub.requests.clear()
    assert download(hub, "config.json") == cached  # cached: one failed HEAD, then the cached file
    assert len(hub.requests) == 1
    hub.fail_next(0)
    assert time.monotonic() - start < 10  # the backoff waits are shortened by online()


def test_a_slow_server_falls_back_to_the_cache(hub: LocalHub, api: HfApi, folder: Path) -> None:
    push(api, folder)
    cached = download(hub, "config.json")
    hub.delay = 3.0
    start = time.monotonic()
    assert download(hub, "config.json", etag_timeout=0.2) == cached
    assert time.monotonic() - start < 2


def test_offline_mode_resolves_cached_files(
    monkeypatch: pytest.MonkeyPatch, hub: LocalHub, api: HfApi, folder: Path
) -> None:
    push(api, folder)
    cached = download(hub, "config.json")
    snapshot = snapshot_download(REPO, endpoint=hub.endpoint, allow_patterns="*.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()

    assert download(hub, "config.json") == cached
    assert snapshot_download(REPO, endpoint=hub.endpoint, allow_patterns="*.safetensors") == snapshot
    with pytest.raises(LocalEntryNotFoundError):
        download(hub, "README.md")
    assert hub.requests == []


def test_listings_follow_pagination(hub: LocalHub, api: HfApi, folder: Path) -> None:
    hub.page_size = 2
    push(api, folder)
    hub.requests.clear()
    assert len(api.list_repo_files(REPO)) == 6
    assert len(hub.requests) == 4  # 8 entries (6 files, 2 folders), 2 per page
    assert len(api.list_repo_commits(REPO)) == 2


def test_dataset_repos(hub: LocalHub, api: HfApi) -> None:
    api.create_repo("test-user/acts", repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"a,b\n1,2\n", path_in_repo="acts.csv", repo_id="test-user/acts", repo_type="dataset"
    )
    path = hf_hub_download("test-user/acts", "acts.csv", repo_type="dataset", endpoint=hub.endpoint)
    assert Path(path).read_bytes() == b"a,b\n1,2\n" and "datasets--test-user--acts" in path
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test-user/acts")  # same id, other type


def test_invalid_readme_metadata_is_refused_before_uploading(hub: LocalHub, api: HfApi, folder: Path) -> None:
    api.create_repo(REPO)
    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_folder(repo_id=REPO, folder_path=folder)
    assert hub.requests[-1] == ("POST", "/api/validate-yaml")


def test_default_endpoint_can_be_left_unreachable(
    monkeypatch: pytest.MonkeyPatch, hub: LocalHub, api: HfApi, folder: Path, tmp_path: Path
) -> None:
    push(api, folder)
    assert "config.json" in huggingface_hub.list_repo_files(REPO)  # the module-level helpers reach the hub

    online(monkeypatch, hub, tmp_path / "other-home", default_endpoint=False)
    hub.requests.clear()
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, "config.json")  # forgot endpoint=: fails instead of reaching any Hub
    with pytest.raises(httpx2.ConnectError):
        huggingface_hub.list_repo_files(REPO)
    assert hub.requests == []
    assert download(hub, "config.json").is_file()


def test_stop_closes_the_port() -> None:
    with LocalHub() as hub:
        port = int(hub.endpoint.rsplit(":", 1)[1])
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    assert not hub.root.exists()
    hub.stop()  # idempotent

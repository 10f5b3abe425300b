"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1, for driving the real `huggingface_hub` client in tests.

`LocalHub` answers the routes that `HfApi`, `hf_hub_download` and `snapshot_download` call (checked against
huggingface_hub 2.4, whose HTTP stack is httpx2), so tests exercise the client's real request building, error
mapping, retries and cache layout instead of mocks. Repos are git-like: every commit is an immutable snapshot
with a real git commit id (40 hex), files have real git blob ids, LFS files have git-lfs pointers, and
branches and tags are refs. File contents live in a temporary folder; the bookkeeping lives in memory.

Example::

    with LocalHub(token="hf_test") as hub:
        online(monkeypatch, hub, tmp_path / "hf-home")
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        api.create_repo("user/zoo")
        api.upload_folder(repo_id="user/zoo", folder_path=folder)
        path = hf_hub_download("user/zoo", "config.json", endpoint=hub.endpoint)

Going online
------------
`huggingface_hub.constants` reads the environment once, at import time, and the rest of the client reads these
module attributes at call time. The test suite runs with `HF_HUB_OFFLINE=1`, so a test that talks to a
`LocalHub` must patch the constants themselves; setting environment variables is too late. `online()` patches:

- `HF_HUB_OFFLINE = False`: checked by the client before every request (`constants.is_offline_mode()`).
- `HF_HUB_DISABLE_XET = True`: checked by `is_xet_available()`; with `hf_xet` installed the client would upload
  and download through Xet, which this server does not speak. The server never advertises Xet either: no
  `X-Xet-*` headers, no `xetHash` in listings, and the LFS batch answer only offers the "basic" transfer.
- `HF_HUB_DISABLE_TELEMETRY = True`: otherwise the first request of the process also fetches
  `{ENDPOINT}/api/agent-harnesses` to build the user agent, an extra request that would show up in
  `LocalHub.requests` of whichever test runs first.
- `HF_HOME`, `HF_HUB_CACHE`, `HF_ASSETS_CACHE`, `HF_TOKEN_PATH`, `HF_STORED_TOKENS_PATH`: a per-test folder, so
  neither the user's cache nor a stored token leaks in. `HF_TOKEN` and the other token variables are removed
  from the environment, because `get_token()` reads them at call time.
- `ENDPOINT`, `HUGGINGFACE_CO_URL_TEMPLATE` and the endpoint of the module-level `HfApi` behind
  `huggingface_hub.list_repo_files` & co.: all three are fixed at import time, so patching `ENDPOINT` alone
  would leave `hf_hub_download(..., endpoint=None)` and the module-level helpers pointing at huggingface.co.
  They point at the hub, or, with `default_endpoint=False`, at a port where nothing listens, so that a code path
  that forgets to pass `endpoint=` fails loudly instead of reaching the real Hub.
- The waits of `huggingface_hub.utils.http_backoff` (see below).

The environment variables of the same names are set too, for subprocesses; those do not get the short waits.

Client behaviour worth knowing (huggingface_hub 2.4, Xet disabled)
------------------------------------------------------------------
- Re-pushing an unchanged folder is a no-op, decided by the client: `upload_folder` -> `create_commit` asks
  `preupload`, whose answer carries the remote `oid` of every path that exists (git blob sha1 for regular files,
  sha256 for LFS files). The client still hashes the LFS files and sends one LFS batch request for them (it
  pre-uploads before filtering); the batch answer has no upload action for objects the repo already holds, so
  nothing is PUT. It then drops every addition whose local oid equals the remote one and, with nothing left,
  logs "No files have been modified since last commit. Skipping to prevent empty commit.", sends no commit, and
  returns a `CommitInfo` whose `oid` is the current head (read with one `repo_info` call). So a re-push costs
  preupload + LFS batch + repo_info (and two validate-yaml calls if the folder has a README.md, which
  `upload_folder` and `create_commit` each check) and creates no commit. Remote files missing from the local
  folder are kept unless `delete_patterns` is passed. A commit request with no-op content sent directly would
  still create a commit here, as git and the real Hub do.
- Retries: `http_backoff` retries 408/429/5xx and network errors 5 times, sleeping 1, 2, 4, 8, 8 s (or
  Retry-After + 1 s, which this server never sends). It is used by preupload, LFS batch/upload/verify and
  paginated listings (`list_repo_tree`, `list_repo_files`, `list_repo_commits`). Plain API calls (`repo_info`,
  `create_repo`, the commit itself, refs, branches, tags) are not retried. `hf_hub_download` sends one HEAD
  without retry; if it fails and nothing is cached, it retries the HEAD with backoff and an etag timeout of 60 s,
  then raises `LocalEntryNotFoundError`; if the file is cached, it returns the cached file. `online()` shortens
  the waits to `retry_wait` seconds (patching `http_backoff.__kwdefaults__`) and keeps the count, so a
  "server down" test still sees the client's 6 attempts, in milliseconds instead of 23 s.
- Timeouts: API calls have none unless the caller passes `timeout=`; `hf_hub_download`'s HEAD uses
  `etag_timeout` (10 s by default), its GET uses `constants.HF_HUB_DOWNLOAD_TIMEOUT`.
- A 401 maps to `RepositoryNotFoundError` only for https URLs; against this http server a write without a token
  raises a plain `HfHubHTTPError` with status 401.

Routes (`{type}` is `models` or `datasets`; file routes put `datasets/` before dataset repos; repo ids are
always `namespace/name`; `{rev}` is a branch, a tag, a commit id or an unambiguous commit id prefix)
--------------------------------------------------------------------------------------------------------------
- `POST /api/repos/create`, `DELETE /api/repos/delete`: create (with the Hub's default `.gitattributes` as
  initial commit; 409 if it exists) and delete repos.
- `GET /api/whoami-v2`: the user behind the token.
- `POST /api/validate-yaml`: the README.md metadata check `create_commit` runs before uploading.
- `GET /api/{type}/{repo}` and `/api/{type}/{repo}/revision/{rev}`: repo info with `sha` and `siblings`
  (with sizes and LFS data when `blobs=true`).
- `GET /api/{type}/{repo}/tree/{rev}[/{path}]`: listing, `recursive` optional, paginated with a `Link` header.
- `POST /api/{type}/{repo}/paths-info/{rev}`: entries of given paths (`get_paths_info`, copies).
- `GET /api/{type}/{repo}/refs`, `GET /api/{type}/{repo}/commits/{rev}` (paginated).
- `POST|DELETE /api/{type}/{repo}/branch/{branch}`, `POST /api/{type}/{repo}/tag/{rev}`,
  `DELETE /api/{type}/{repo}/tag/{tag}`.
- `POST /api/{type}/{repo}/preupload/{rev}`: "lfs" for files tracked by the revision's `.gitattributes`, files of
  at least `lfs_threshold` bytes (10 MiB by default: the Hub's limit for regular files) and binary files (a NUL
  byte in the 512-byte sample); "regular" otherwise. `.gitignore` is not applied: `shouldIgnore` is always false.
- `POST /api/{type}/{repo}/commit/{branch}`: NDJSON `header`, `file` (base64 or text), `lfsFile`, `deletedFile`,
  `deletedFolder`; honours `parentCommit` (412 if the branch moved). Pull requests are not supported.
- `POST /{repo}.git/info/lfs/objects/batch`: upload actions for objects the repo lacks, each with a single-use
  upload URL `PUT /lfs-upload/{ticket}` (standing in for the presigned S3 URL, so it needs no token) and a
  verify action `POST /{repo}.git/info/lfs/objects/verify`.
- `GET|HEAD /{repo}/resolve/{rev}/{path}`: the file, with `X-Repo-Commit`, `ETag` (git blob id, or sha256 for
  LFS files, plus `X-Linked-Etag`/`X-Linked-Size`) and `Content-Length`. Served directly, without the CDN
  redirect of the real Hub. Range requests get the whole file with 200, which the client handles.

Errors carry the Hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) and
`X-Error-Message` headers and a `{"error": ...}` body, which `hf_raise_for_status` maps to
`RepositoryNotFoundError`, `RevisionNotFoundError` and `RemoteEntryNotFoundError`. With `LocalHub(token=...)`,
writes without the token get 401 "Invalid username or password."; any request with another token gets 401
"Invalid credentials in Authorization header"; private repos are invisible (404 RepoNotFound) without the token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import chain
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest
import yaml

# The `.gitattributes` the real Hub commits when it creates a model or dataset repo.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar",
        "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip

# Messages the real Hub sends; the client matches on the second one.
_MISSING_TOKEN = "Invalid username or password."
_INVALID_TOKEN = "Invalid credentials in Authorization header"

# Where `online(default_endpoint=False)` points the client's defaults: nothing listens on port 1.
_NOWHERE = "http://127.0.0.1:1"

_TYPE_BY_PLURAL = {"models": "model", "datasets": "dataset"}
_URL_PREFIX = {"model": "", "dataset": "datasets/"}
_REPO_NAME = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?")
_COMMIT_PREFIX = re.compile(r"[0-9a-f]{7,40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- Git objects ---------------------------------------------------------------------------------------------


def git_oid(kind: str, body: bytes) -> str:
    """The git object id of `body` (`kind` is "blob", "tree" or "commit"), as `git hash-object -t kind` gives."""
    return hashlib.sha1(f"{kind} {len(body)}\0".encode() + body).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class _File:
    """A file of a snapshot. `blob_oid` is the git blob id: of the content, or of the pointer for LFS files."""

    blob_oid: str
    size: int
    lfs_oid: str | None = None  # sha256 of the content, for LFS files

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag and the client names cached blobs by."""
        return self.lfs_oid or self.blob_oid

    @property
    def pointer_size(self) -> int:
        assert self.lfs_oid is not None
        return len(lfs_pointer(self.lfs_oid, self.size))


def _folder_oids(files: Mapping[str, _File]) -> dict[str, str]:
    """The git tree id of every folder of a snapshot, keyed by folder path ("" for the root)."""
    entries: dict[str, dict[str, tuple[str, str]]] = {"": {}}  # folder -> name -> (git mode, oid)
    for path, file in files.items():
        parts = path.split("/")
        for depth in range(1, len(parts)):
            entries.setdefault("/".join(parts[:depth]), {})
        entries["/".join(parts[:-1])][parts[-1]] = ("100644", file.blob_oid)
    oids: dict[str, str] = {}
    # Deepest folders first, so that every subtree id is known when its parent is hashed; the root comes last.
    for folder in sorted(entries, key=lambda folder: folder.count("/") if folder else -1, reverse=True):
        # Git orders tree entries by name, with "/" appended to the names of subtrees.
        ordered = sorted(entries[folder].items(), key=lambda item: item[0] + ("/" if item[1][0] == "40000" else ""))
        body = b"".join(f"{mode} {name}".encode() + b"\0" + bytes.fromhex(oid) for name, (mode, oid) in ordered)
        oids[folder] = git_oid("tree", body)
        if folder:
            parent, _, name = folder.rpartition("/")
            entries[parent][name] = ("40000", oids[folder])
    return oids


@dataclass(frozen=True)
class _Commit:
    """An immutable snapshot: `files` and `folders` are read-only views of dicts nobody else holds."""

    oid: str
    parent: str | None
    files: Mapping[str, _File]
    folders: Mapping[str, str]  # folder path -> git tree id, "" being the root
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    root: Path  # blobs/<git blob id> holds regular files, lfs/<sha256> LFS files
    created_at: datetime
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def url_path(self) -> str:
        return _URL_PREFIX[self.repo_type] + self.repo_id

    def read(self, file: _File) -> bytes:
        return (self.root / ("lfs" if file.lfs_oid else "blobs") / file.etag).read_bytes()


# --- HTTP plumbing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    method: str
    path: str  # percent-encoded, without the query: the client quotes "/" in revisions as %2F
    query: dict[str, list[str]]
    headers: Message
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Request body is not JSON: {error}") from error

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[0].lower() in ("1", "true")


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
    headers = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
    return _Response(status, json.dumps(data).encode(), headers)


class HubError(Exception):
    """An error answer, in the Hub's format: JSON `{"error": ...}` body plus `X-Error-*` headers.

    `headers` and `body` add to those, for errors that carry data the client reads.
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.body = dict(body or {})

    def response(self) -> _Response:
        # Header values must be latin-1; paths in messages may not be.
        headers = {"X-Error-Message": self.message.encode("ascii", "backslashreplace").decode(), **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return _json_response({"error": self.message, **self.body}, self.status, headers)


class _Route(NamedTuple):
    methods: frozenset[str]
    pattern: re.Pattern[str]
    handler: Callable[[_Request, dict[str, str]], _Response]
    write: bool  # needs the hub's token


class _Failure(NamedTuple):
    remaining: int
    status: int
    path_contains: str | None


class _Server(ThreadingHTTPServer):
    """Keeps track of open connections, so that `stop()` can end the client's idle keep-alive connections."""

    daemon_threads = True

    def __init__(self, hub: LocalHub) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP/1.1 requests into `_Request`s for the hub and writes back its `_Response`s."""

    protocol_version = "HTTP/1.1"  # keep-alive, as with the real Hub; every response has a Content-Length
    server: _Server

    def _serve(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            # httpx2 always sends a Content-Length for the bodies huggingface_hub builds.
            self._write(HubError(411, "Chunked request bodies are not supported").response())
            self.close_connection = True
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        request = _Request(self.command, url.path, parse_qs(url.query), self.headers, body)
        self._write(self.server.hub._handle(request))

    def _write(self, response: _Response) -> None:
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout) or the hub is stopping

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: `LocalHub.requests` is the log, and stderr lines would bury test output."""


# --- The hub -------------------------------------------------------------------------------------------------

_API_REPO = r"/api/(?P<type>models|datasets)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_GIT_REPO = r"/(?:(?P<type>datasets)/)?(?P<ns>[^/]+)/(?P<name>[^/]+?)"


class LocalHub:
    """A threaded Hub-compatible server on 127.0.0.1 (see the module docstring for routes and client notes).

    Args:
        token: if set, writes need `Authorization: Bearer <token>` and private repos are only visible with it.
            If None, every request is accepted.
        username: the namespace of repos created without one, and the author of commits.
        lfs_threshold: files of at least this many bytes are uploaded as LFS (the Hub refuses regular files above
            10 MB); lower it to exercise the LFS size rule with small files.
        page_size: entries per page of tree and commit listings (the Hub uses 1000).

    Attributes:
        endpoint: `http://127.0.0.1:PORT`, to pass as `endpoint=` to the client.
        requests: `(method, path)` of every request received, in order, path percent-decoded and without query.
        delay: seconds to wait before answering each request, to simulate a slow server.
        errors: tracebacks of requests that crashed the server (answered with 500); a test should expect none.
        root: the temporary folder holding the repos' files.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        username: str = "test-user",
        lfs_threshold: int = 10 * 1024 * 1024,
        page_size: int = 1000,
    ) -> None:
        self.token = token
        self.username = username
        self.lfs_threshold = lfs_threshold
        self.page_size = page_size
        self.delay = 0.0
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="localhub-")
        self.root = Path(self._tmp.name)
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._tickets: dict[str, tuple[_Repo, str, int]] = {}  # LFS upload URL ticket -> (repo, sha256, size)
        self._failure: _Failure | None = None
        # One lock for all state: requests are handled one at a time, which makes every commit atomic.
        self._lock = threading.RLock()
        self._stopped = threading.Event()
        self._routes = self._route_table()
        self._server = _Server(self)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> LocalHub:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving, close open connections and delete the repos. Idempotent."""
        if self._thread is None:
            return
        self._stopped.set()  # wakes requests sleeping in `delay`
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._thread = None
        self._tmp.cleanup()

    def fail_next(self, n: int, status: int = 503, *, path_contains: str | None = None) -> None:
        """Answer the next `n` requests (whose path contains `path_contains`, if given) with `status`.

        Replaces any failure still pending. The failed requests are logged in `requests` like the others.
        """
        with self._lock:
            self._failure = _Failure(n, status, path_contains) if n > 0 else None

    # --- dispatch ----------------------------------------------------------------------------------------------

    def _route_table(self) -> list[_Route]:
        def route(methods: str, pattern: str, handler: Callable[..., _Response], write: bool = False) -> _Route:
            return _Route(frozenset(methods.split()), re.compile(pattern), handler, write)

        return [
            route("POST", r"/api/repos/create", self._create_repo, write=True),
            route("DELETE", r"/api/repos/delete", self._delete_repo, write=True),
            route("GET", r"/api/whoami-v2", self._whoami),
            route("POST", r"/api/validate-yaml", self._validate_yaml),
            route("GET", _API_REPO + r"(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
            route("GET", _API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", self._tree),
            route("POST", _API_REPO + r"/paths-info/(?P<rev>[^/]+)", self._paths_info),
            route("GET", _API_REPO + r"/refs", self._refs),
            route("GET", _API_REPO + r"/commits/(?P<rev>[^/]+)", self._commits),
            route("POST", _API_REPO + r"/preupload/(?P<rev>[^/]+)", self._preupload, write=True),
            route("POST", _API_REPO + r"/commit/(?P<rev>[^/]+)", self._commit, write=True),
            route("POST", _API_REPO + r"/branch/(?P<rev>[^/]+)", self._create_branch, write=True),
            route("DELETE", _API_REPO + r"/branch/(?P<rev>[^/]+)", self._delete_branch, write=True),
            route("POST", _API_REPO + r"/tag/(?P<rev>[^/]+)", self._create_tag, write=True),
            route("DELETE", _API_REPO + r"/tag/(?P<rev>[^/]+)", self._delete_tag, write=True),
            route("POST", _GIT_REPO + r"\.git/info/lfs/objects/batch", self._lfs_batch, write=True),
            route("POST", _GIT_REPO + r"\.git/info/lfs/objects/verify", self._lfs_verify, write=True),
            route("PUT", r"/lfs-upload/(?P<ticket>[^/]+)", self._lfs_upload),  # the ticket is the credential
            route("GET HEAD", _GIT_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve),
        ]

    def _handle(self, request: _Request) -> _Response:
        path = unquote(request.path)
        with self._lock:
            self.requests.append((request.method, path))
            failure_status = self._take_failure(path)
        if self.delay:
            self._stopped.wait(self.delay)
        if self._stopped.is_set():
            return HubError(503, "LocalHub is stopping").response()
        if failure_status is not None:
            return HubError(failure_status, "LocalHub: simulated failure").response()
        try:
            route, params = self._match(request)
            self._authorize(request, write=route.write)
            with self._lock:
                return route.handler(request, params)
        except HubError as error:
            return error.response()
        except Exception:  # a bug in the hub: make it visible to the test instead of a hung client
            self.errors.append(traceback.format_exc())
            traceback.print_exc()
            return HubError(500, "LocalHub crashed; see LocalHub.errors").response()

    def _take_failure(self, path: str) -> int | None:
        failure = self._failure
        if failure is None or (failure.path_contains is not None and failure.path_contains not in path):
            return None
        self._failure = failure._replace(remaining=failure.remaining - 1) if failure.remaining > 1 else None
        return failure.status

    def _match(self, request: _Request) -> tuple[_Route, dict[str, str]]:
        for route in self._routes:
            match = route.pattern.fullmatch(request.path)
            if match is not None and request.method in route.methods:
                return route, {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
        raise HubError(404, f"LocalHub does not serve {request.method} {unquote(request.path)}")

    def _authorize(self, request: _Request, *, write: bool) -> None:
        if self.token is None:
            return
        authorization = request.headers.get("Authorization")
        if authorization is None:
            if write:
                raise HubError(401, _MISSING_TOKEN)
        elif authorization != f"Bearer {self.token}":
            raise HubError(401, _INVALID_TOKEN)

    def _authenticated(self, request: _Request) -> bool:
        return self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}"

    # --- state helpers -----------------------------------------------------------------------------------------

    def _repo(self, request: _Request, params: Mapping[str, str]) -> _Repo:
        # API routes always name the type; file and git routes only name "datasets".
        repo_type = _TYPE_BY_PLURAL[params.get("type", "models")]
        repo = self._repos.get((repo_type, f"{params['ns']}/{params['name']}"))
        if repo is None or (repo.private and not self._authenticated(request)):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    @staticmethod
    def _commit_at(repo: _Repo, revision: str) -> _Commit:
        oid = repo.branches.get(revision) or repo.tags.get(revision)
        if oid is None and _COMMIT_PREFIX.fullmatch(revision):
            candidates = [commit for commit in repo.commits if commit.startswith(revision)]
            oid = candidates[0] if len(candidates) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return repo.commits[oid]

    @staticmethod
    def _branch_head(repo: _Repo, branch: str) -> _Commit:
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} is not a branch", code="RevisionNotFound")
        return repo.commits[repo.branches[branch]]

    @staticmethod
    def _store_regular(repo: _Repo, content: bytes) -> _File:
        oid = git_oid("blob", content)
        _write_atomic(repo.root / "blobs" / oid, content)
        return _File(oid, len(content))

    @staticmethod
    def _new_commit(
        repo: _Repo, parent: _Commit | None, files: dict[str, _File], title: str, message: str, author: str
    ) -> _Commit:
        folders = _folder_oids(files)
        date = datetime.now(timezone.utc)
        lines = [f"tree {folders['']}"]
        if parent is not None:
            lines.append(f"parent {parent.oid}")
        signature = f"{author} <{author}@localhub> {int(date.timestamp())} +0000"
        lines += [f"author {signature}", f"committer {signature}", "", title + (f"\n\n{message}" if message else "")]
        oid = git_oid("commit", "\n".join(lines).encode() + b"\n")
        commit = _Commit(
            oid=oid,
            parent=parent.oid if parent is not None else None,
            files=MappingProxyType(files),
            folders=MappingProxyType(folders),
            title=title,
            message=message,
            author=author,
            date=date,
        )
        repo.commits[oid] = commit
        return commit

    @staticmethod
    def _lfs_patterns(repo: _Repo, commit: _Commit) -> list[str]:
        """The patterns marked `filter=lfs` in the snapshot's `.gitattributes`."""
        gitattributes = commit.files.get(".gitattributes")
        if gitattributes is None:
            return []
        lines = repo.read(gitattributes).decode(errors="replace").splitlines()
        return [fields[0] for fields in map(str.split, lines) if fields and "filter=lfs" in fields[1:]]

    @staticmethod
    def _entry(commit: _Commit, path: str) -> dict[str, Any]:
        """A tree entry as the Hub lists it (parsed by the client into `RepoFile` / `RepoFolder`)."""
        if path in commit.folders:
            return {"type": "directory", "oid": commit.folders[path], "size": 0, "path": path}
        file = commit.files[path]
        entry: dict[str, Any] = {"type": "file", "oid": file.blob_oid, "size": file.size, "path": path}
        if file.lfs_oid is not None:
            entry["lfs"] = {"oid": file.lfs_oid, "size": file.size, "pointerSize": file.pointer_size}
        return entry

    def _page(self, request: _Request, items: list[Any]) -> _Response:
        """One page of `items`, with a GitHub-style `Link: <...>; rel="next"` header if more follow."""
        try:
            start = int(request.query.get("cursor", ["0"])[0])
        except ValueError as error:
            raise HubError(400, "Invalid cursor") from error
        end = start + self.page_size
        headers = {}
        if end < len(items):
            query = {key: value for key, value in request.query.items() if key != "cursor"} | {"cursor": [str(end)]}
            headers["Link"] = f'<{self.endpoint}{request.path}?{urlencode(query, doseq=True)}>; rel="next"'
        return _json_response(items[start:end], headers=headers)

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{repo.url_path}"

    # --- repos -------------------------------------------------------------------------------------------------

    def _create_repo(self, request: _Request, params: dict[str, str]) -> _Response:
        body = request.json()
        repo_type = body.get("type") or "model"
        namespace, name = body.get("organization") or self.username, body.get("name", "")
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"LocalHub does not host {repo_type} repos")
        if not all(_REPO_NAME.fullmatch(part) and "--" not in part and ".." not in part for part in (namespace, name)):
            raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        if (repo_type, repo_id) in self._repos:
            # `create_repo(exist_ok=True)` returns the url of the 409 answer.
            url = self._repo_url(self._repos[(repo_type, repo_id)])
            raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
        repo = _Repo(
            repo_type=repo_type,
            repo_id=repo_id,
            private=body.get("visibility") == "private",
            root=self.root / f"{repo_type}s" / namespace / name,
            created_at=datetime.now(timezone.utc),
        )
        files = {".gitattributes": self._store_regular(repo, DEFAULT_GITATTRIBUTES.encode())}
        repo.branches["main"] = self._new_commit(repo, None, files, "initial commit", "", "system").oid
        self._repos[(repo_type, repo_id)] = repo
        return _json_response({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, request: _Request, params: dict[str, str]) -> _Response:
        body = request.json()
        key = (body.get("type") or "model", f"{body.get('organization') or self.username}/{body.get('name')}")
        repo = self._repos.pop(key, None)
        if repo is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        self._tickets = {ticket: value for ticket, value in self._tickets.items() if value[0] is not repo}
        shutil.rmtree(repo.root, ignore_errors=True)
        return _json_response({})

    def _whoami(self, request: _Request, params: dict[str, str]) -> _Response:
        if request.headers.get("Authorization") is None:
            raise HubError(401, _MISSING_TOKEN)
        return _json_response(
            {
                "type": "user",
                "name": self.username,
                "fullname": self.username,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "localhub", "role": "write"}},
            }
        )

    def _validate_yaml(self, request: _Request, params: dict[str, str]) -> _Response:
        error = _front_matter_error(request.json().get("content", ""))
        if error is not None:
            return _json_response({"errors": [{"message": error}], "warnings": []}, status=400)
        return _json_response({"errors": [], "warnings": []})

    def _repo_info(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        commit = self._commit_at(repo, params.get("rev", "main"))
        siblings = []
        for path, file in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if request.flag("blobs"):
                sibling |= {"size": file.size, "blobId": file.blob_oid}
                if file.lfs_oid is not None:
                    sibling["lfs"] = {"sha256": file.lfs_oid, "size": file.size, "pointerSize": file.pointer_size}
            siblings.append(sibling)
        return _json_response(
            {
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": _iso(commit.date),
                "createdAt": _iso(repo.created_at),
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    # --- listings ----------------------------------------------------------------------------------------------

    def _tree(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        commit = self._commit_at(repo, params["rev"])
        folder = params.get("path", "").strip("/")
        if folder not in commit.folders:
            raise HubError(404, f"{folder} is not a folder on {params['rev']}", code="EntryNotFound")
        prefix = f"{folder}/" if folder else ""
        recursive = request.flag("recursive")
        paths = sorted(
            path
            for path in chain(commit.folders, commit.files)
            if path.startswith(prefix) and path != folder and (recursive or "/" not in path[len(prefix) :])
        )
        return self._page(request, [self._entry(commit, path) for path in paths])

    def _paths_info(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        commit = self._commit_at(repo, params["rev"])
        paths = [path.strip("/") for path in parse_qs(request.body.decode()).get("paths", [])]
        # Paths that do not exist are left out, as on the Hub.
        found = [path for path in paths if path in commit.files or (path and path in commit.folders)]
        return _json_response([self._entry(commit, path) for path in found])

    def _refs(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)

        def refs(kind: str, targets: Mapping[str, str]) -> list[dict[str, str]]:
            return [
                {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}
                for name, oid in sorted(targets.items())
            ]

        data = {"branches": refs("heads", repo.branches), "converts": [], "tags": refs("tags", repo.tags)}
        if request.flag("include_prs"):
            data["pullRequests"] = []
        return _json_response(data)

    def _commits(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        commit: _Commit | None = self._commit_at(repo, params["rev"])
        history = []
        while commit is not None:  # ends at the initial commit: parents are never deleted
            history.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "date": _iso(commit.date),
                    "authors": [{"user": commit.author}],
                }
            )
            commit = repo.commits[commit.parent] if commit.parent is not None else None
        return self._page(request, history)

    # --- refs --------------------------------------------------------------------------------------------------

    def _create_branch(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        branch = params["rev"]
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = self._commit_at(repo, request.json().get("startingPoint") or "main").oid
        return _json_response({})

    def _delete_branch(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        branch = params["rev"]
        self._branch_head(repo, branch)
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        del repo.branches[branch]
        return _json_response({})

    def _create_tag(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        tag = request.json().get("tag", "")
        if not tag:
            raise HubError(400, "Missing tag name")
        if tag in repo.tags:
            raise HubError(409, f"Tag already exists: refs/tags/{tag}")
        repo.tags[tag] = self._commit_at(repo, params["rev"]).oid
        return _json_response({})

    def _delete_tag(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        if repo.tags.pop(params["rev"], None) is None:
            raise HubError(404, f"Invalid rev id: {params['rev']} is not a tag", code="RevisionNotFound")
        return _json_response({})

    # --- uploads -----------------------------------------------------------------------------------------------

    def _preupload(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        commit = self._commit_at(repo, params["rev"])
        lfs_patterns = self._lfs_patterns(repo, commit)
        answers = []
        for item in request.json().get("files", []):
            path, size, sample = item["path"], item["size"], base64.b64decode(item["sample"])
            # The Hub's rules: tracked by .gitattributes, too large for git, or binary (git's NUL-byte test).
            lfs = size >= self.lfs_threshold or b"\0" in sample or _matches_gitattributes(path, lfs_patterns)
            answer = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in commit.files:
                # What the client compares with its local oid to drop unchanged files from the commit.
                answer["oid"] = commit.files[path].etag
            answers.append(answer)
        return _json_response({"files": answers, "commitOid": commit.oid})

    def _lfs_batch(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        body = request.json()
        if body.get("operation") != "upload":
            raise HubError(400, "LocalHub's LFS batch endpoint only handles uploads")
        if "ref" in body:
            self._branch_head(repo, body["ref"]["name"])
        objects = []
        for item in body.get("objects", []):
            oid, size = _check_sha256(item.get("oid", "")), item.get("size")
            answer: dict[str, Any] = {"oid": oid, "size": size}
            if not (repo.root / "lfs" / oid).is_file():  # no "actions" tells the client the object is there
                ticket = secrets.token_urlsafe(16)
                self._tickets[ticket] = (repo, oid, size)
                answer["authenticated"] = True
                answer["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs-upload/{ticket}", "expires_in": 3600},
                    "verify": {"href": f"{self._repo_url(repo)}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(answer)
        return _json_response({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_upload(self, request: _Request, params: dict[str, str]) -> _Response:
        if params["ticket"] not in self._tickets:
            raise HubError(403, "Upload URL is invalid or was already used")
        repo, oid, size = self._tickets[params["ticket"]]
        if len(request.body) != size or hashlib.sha256(request.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
        _write_atomic(repo.root / "lfs" / oid, request.body)
        del self._tickets[params["ticket"]]
        return _Response(200)

    def _lfs_verify(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        body = request.json()
        path = repo.root / "lfs" / _check_sha256(body.get("oid", ""))
        if not path.is_file() or path.stat().st_size != body.get("size"):
            raise HubError(404, f"LFS object {body.get('oid')} was not uploaded")
        return _json_response({})

    def _commit(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        branch = params["rev"]
        head = self._branch_head(repo, branch)
        if request.flag("create_pr"):
            raise HubError(400, "LocalHub does not support pull requests")
        try:
            lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise HubError(400, f"Commit body is not NDJSON: {error}") from error
        if not all(isinstance(line, dict) and "key" in line and "value" in line for line in lines):
            raise HubError(400, "Every commit line needs a key and a value")
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "Commit header with a summary is required")
        parent = header.get("parentCommit")
        if parent is not None and not head.oid.startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines:
            self._apply(repo, files, line["key"], line["value"])
        folders = {"/".join(path.split("/")[:depth]) for path in files for depth in range(1, path.count("/") + 1)}
        if clashes := sorted(folders & files.keys()):
            raise HubError(400, f"Paths used both as file and as folder: {clashes}")
        commit = self._new_commit(repo, head, files, header["summary"], header.get("description", ""), self.username)
        repo.branches[branch] = commit.oid
        return _json_response(
            {"success": True, "commitOid": commit.oid, "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}"}
        )

    def _apply(self, repo: _Repo, files: dict[str, _File], key: str, value: dict[str, Any]) -> None:
        """Apply one NDJSON line of a commit to the file table being built."""
        if key == "header":
            return
        path = value.get("path", "")
        if key == "deletedFolder":
            folder = path.strip("/") + "/"
            doomed = [name for name in files if name.startswith(folder)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
            for name in doomed:
                del files[name]
            return
        _check_repo_path(path)
        if key == "file":
            content = value.get("content", "")
            data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            files[path] = self._store_regular(repo, data)
        elif key == "lfsFile":
            oid = _check_sha256(value.get("oid", ""))
            stored = repo.root / "lfs" / oid
            if not stored.is_file():
                raise HubError(400, f"LFS object {oid} of {path} was never uploaded to this repo")
            size = stored.stat().st_size
            if value.get("size", size) != size:
                raise HubError(400, f"LFS object {oid} has size {size}, not {value['size']}")
            files[path] = _File(git_oid("blob", lfs_pointer(oid, size)), size, oid)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
        else:
            raise HubError(400, f"Unknown commit operation: {key}")

    # --- downloads ---------------------------------------------------------------------------------------------

    def _resolve(self, request: _Request, params: dict[str, str]) -> _Response:
        repo = self._repo(request, params)
        commit = self._commit_at(repo, params["rev"])
        headers = {"X-Repo-Commit": commit.oid}
        file = commit.files.get(params["path"])
        if file is None:
            # The commit header lets the client cache the file's absence (.no_exist/<commit>/<path>).
            raise HubError(404, f"Entry not found: {params['path']}", code="EntryNotFound", headers=headers)
        headers |= {"ETag": f'"{file.etag}"', "Content-Type": "application/octet-stream"}
        if file.lfs_oid is not None:
            headers |= {"X-Linked-Etag": f'"{file.lfs_oid}"', "X-Linked-Size": str(file.size)}
        return _Response(200, repo.read(file), headers)


# --- Small helpers -------------------------------------------------------------------------------------------


def _iso(date: datetime) -> str:
    return date.strftime("%Y-%m-%dT%H:%M:%S.") + f"{date.microsecond // 1000:03d}Z"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file, so that a concurrent reader never sees half a blob."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_repo_path(path: str) -> None:
    parts = path.split("/")
    if not path or any(part in ("", ".", "..", ".git") for part in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}")


def _check_sha256(oid: str) -> str:
    """`oid`, checked to be a sha256 in hex: LFS oids name files on disk."""
    if not _SHA256.fullmatch(oid):
        raise HubError(400, f"Invalid LFS oid: {oid!r}")
    return oid


def _matches_gitattributes(path: str, patterns: list[str]) -> bool:
    """Approximates gitattributes matching: patterns without "/" match the file name, others the whole path."""
    name = path.rpartition("/")[2]
    return any(fnmatchcase(path if "/" in pattern else name, pattern) for pattern in patterns)


def _front_matter_error(content: str) -> str | None:
    """Why the YAML metadata block of a README.md is invalid, or None if it is valid or absent."""
    if not content.startswith("---"):
        return None
    end = content.find("\n---", 3)
    if end == -1:
        return "The metadata block of README.md is not closed by '---'"
    try:
        metadata = yaml.safe_load(content[3:end])
    except yaml.YAMLError as error:
        return f"Invalid YAML in the metadata block of README.md: {error}"
    if metadata is not None and not isinstance(metadata, dict):
        return "The metadata block of README.md must be a YAML mapping"
    return None


# --- Client side ---------------------------------------------------------------------------------------------


def online(
    monkeypatch: pytest.MonkeyPatch,
    hub: LocalHub,
    home: Path,
    *,
    default_endpoint: bool = True,
    retry_wait: float = 0.01,
) -> Path:
    """Let `huggingface_hub` talk to `hub` for the rest of the test; return the cache folder it will use.

    Patches `huggingface_hub.constants` (see the module docstring for each one and why), the environment, and
    the waits between retries of `http_backoff` (to `retry_wait` seconds; the number of retries is unchanged).
    Everything is undone by `monkeypatch` at the end of the test.

    Args:
        home: an empty folder for HF_HOME; the cache goes to `home / "hub"`.
        default_endpoint: point the client's default endpoint at the hub; if False, at a port where nothing
            listens, so that a call missing `endpoint=` fails instead of being served.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import http_backoff

    endpoint = hub.endpoint if default_endpoint else _NOWHERE
    cache = home / "hub"
    settings: dict[str, Any] = {
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    }
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    environment = {
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_ENDPOINT": endpoint,
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(http_backoff.__kwdefaults__, "base_wait_time", retry_wait)
    monkeypatch.setitem(http_backoff.__kwdefaults__, "max_wait_time", retry_wait)
    return cache

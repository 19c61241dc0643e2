"""A fake Hugging Face Hub on 127.0.0.1: just the requests `huggingface_hub` makes to push a folder over LFS.

    with FakeHub(token="hf_x") as hub:        # random free port; point HF_ENDPOINT at hub.url
        ...
        hub.commits, hub.lfs_objects, hub.requests

Endpoints (as huggingface_hub 2.4 calls them, with `HF_HUB_DISABLE_XET`):
  GET  /api/whoami-v2                                    the token's user
  GET  /api/models/{repo}[/revision/{rev}]               repo info (404 + X-Error-Code: RepoNotFound when missing)
  POST /api/repos/create                                 200 created, 409 exists
  POST /api/models/{repo}/branch/{branch}                200 created, 409 exists
  POST /api/validate-yaml                                no errors
  POST /api/models/{repo}/preupload/{rev}                "lfs" for .safetensors and files over `lfs_threshold`
  POST /{repo}.git/info/lfs/objects/batch                upload actions pointing at PUT /lfs-upload/{oid}
  PUT  /lfs-upload/{oid}                                 stores the bytes (400 when they do not hash to oid)
  POST /api/models/{repo}/commit/{rev}                   NDJSON: header, then file / lfsFile lines

`fail` makes it misbehave: "whoami_401", "create_403", "commit_403", "lfs_close" (close the connection without
answering an LFS upload). Every request is recorded (method, path, headers, body) before it is answered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class Recorded:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names in lower case (HTTP header names are case-insensitive)
    body: bytes


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]  # regular files: their content
    lfs_files: dict[str, dict[str, Any]]  # LFS files: {"oid": ..., "size": ...}
    create_pr: bool


@dataclass
class Repo:
    private: bool | None
    branches: set[str] = field(default_factory=lambda: {"main"})


class FakeHub:
    def __init__(self, token: str, user: str = "alice", role: str = "write", lfs_threshold: int = 10_000):
        self.token = token
        self.user = user
        self.role = role
        self.lfs_threshold = lfs_threshold
        self.fail: set[str] = set()
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # oid (sha256 hex) -> content
        self.commits: list[Commit] = []
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def lfs_sha256(self) -> dict[str, str]:
        """sha256 of every stored LFS object, computed from the bytes the server received."""
        return {oid: hashlib.sha256(data).hexdigest() for oid, data in self.lfs_objects.items()}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: pytest shows failures, not every request

    # ---- plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.hub.token}":
            return True
        self._send(401, {"error": "Invalid credentials in Authorization header"},
                   {"X-Error-Message": "Invalid credentials in Authorization header"})
        return False

    def _handle(self) -> None:
        hub = self.hub
        body = self._body()
        with hub.lock:
            hub.requests.append(Recorded(self.command, self.path,
                                        {k.lower(): v for k, v in self.headers.items()}, body))
        path = unquote(urlsplit(self.path).path)
        query = urlsplit(self.path).query
        route = _route(self.command, path)
        if route is None:
            self._send(404, {"error": f"no route for {self.command} {path}"})
            return
        name, args = route
        if name != "lfs_upload" and not self._authorized():
            return
        with hub.lock:
            getattr(self, f"_{name}")(body, query, *args)

    do_GET = do_POST = do_PUT = _handle

    # ---- endpoints (called with the hub's lock held)

    def _repo_missing(self, repo_id: str) -> bool:
        if repo_id in self.hub.repos:
            return False
        self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return True

    def _whoami(self, body: bytes, query: str) -> None:
        if "whoami_401" in self.hub.fail:
            self._send(401, {"error": "Invalid user token"})
            return
        self._send(200, {"type": "user", "name": self.hub.user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": self.hub.role}}})

    def _repo_info(self, body: bytes, query: str, repo_id: str) -> None:
        if not self._repo_missing(repo_id):
            self._send(200, {"id": repo_id, "private": bool(self.hub.repos[repo_id].private), "sha": "0" * 40})

    def _create_repo(self, body: bytes, query: str) -> None:
        if "create_403" in self.hub.fail:
            self._send(403, {"error": "You don't have the rights to create a model under this namespace"})
            return
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        if repo_id in self.hub.repos:
            self._send(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
            return
        visibility = payload.get("visibility")
        self.hub.repos[repo_id] = Repo(private=None if visibility is None else visibility == "private")
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _create_branch(self, body: bytes, query: str, repo_id: str, branch: str) -> None:
        if self._repo_missing(repo_id):
            return
        if branch in self.hub.repos[repo_id].branches:
            self._send(409, {"error": "Reference already exists"})
            return
        self.hub.repos[repo_id].branches.add(branch)
        self._send(200, {})

    def _validate_yaml(self, body: bytes, query: str) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def _preupload(self, body: bytes, query: str, repo_id: str, revision: str) -> None:
        if self._repo_missing(repo_id):
            return
        files = [{"path": f["path"], "shouldIgnore": False, "oid": None,
                  "uploadMode": "lfs" if f["path"].endswith(".safetensors") or f["size"] > self.hub.lfs_threshold
                  else "regular"} for f in json.loads(body)["files"]]
        self._send(200, {"files": files, "commitOid": "0" * 40})

    def _lfs_batch(self, body: bytes, query: str, repo_id: str) -> None:
        if self._repo_missing(repo_id):
            return
        objects = []
        for obj in json.loads(body)["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, body: bytes, query: str, oid: str) -> None:
        if "lfs_close" in self.hub.fail:
            self.close_connection = True  # no answer at all: the client sees the server disconnect
            return
        if hashlib.sha256(body).hexdigest() != oid:
            self._send(400, {"error": "content does not match its oid"})
            return
        self.hub.lfs_objects[oid] = body
        self._send(200, {})

    def _commit(self, body: bytes, query: str, repo_id: str, revision: str) -> None:
        if self._repo_missing(repo_id):
            return
        if "commit_403" in self.hub.fail:
            self._send(403, {"error": "You don't have the rights to create a commit in this repository"})
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
        files, lfs_files = {}, {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    self._send(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                    return
                lfs_files[value["path"]] = {"oid": value["oid"], "size": value.get("size")}
        create_pr = "create_pr=1" in query
        self.hub.commits.append(Commit(repo_id, revision, header.get("summary", ""), header.get("description", ""),
                                       files, lfs_files, create_pr))
        oid = hashlib.sha1(body).hexdigest()
        answer = {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}"}
        if create_pr:
            answer["pullRequestUrl"] = f"{self.hub.url}/{repo_id}/discussions/{len(self.hub.commits)}"
        self._send(200, answer)


def _route(method: str, path: str) -> tuple[str, tuple[str, ...]] | None:
    """(endpoint name, its arguments) for a request path (already unquoted); repo ids are "ns/name"."""
    parts = path.strip("/").split("/")
    if method == "GET" and path == "/api/whoami-v2":
        return "whoami", ()
    if method == "POST" and path == "/api/repos/create":
        return "create_repo", ()
    if method == "POST" and path == "/api/validate-yaml":
        return "validate_yaml", ()
    if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
        return "lfs_upload", (parts[1],)
    if method == "POST" and path.endswith(".git/info/lfs/objects/batch") and len(parts) == 6:
        return "lfs_batch", (f"{parts[0]}/{parts[1].removesuffix('.git')}",)
    if len(parts) < 4 or parts[:2] != ["api", "models"]:
        return None
    repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
    if method == "GET" and (not rest or rest[0] == "revision"):
        return "repo_info", (repo_id,)
    if method == "POST" and len(rest) >= 2 and rest[0] in ("preupload", "commit", "branch"):
        name = {"preupload": "preupload", "commit": "commit", "branch": "create_branch"}[rest[0]]
        return name, (repo_id, "/".join(rest[1:]))
    return None

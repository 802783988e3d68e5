"""A Hub-compatible HTTP server on 127.0.0.1 for the tests: the real huggingface_hub and datasets code
resolves, lists, downloads and caches from it through HF_ENDPOINT, as it would from huggingface.co.

It serves what those libraries call: the repo info API (`/api/{models,datasets}/ID[/revision/REV]`,
with `siblings` and `sha`), the tree listing (`/api/.../tree/REV[/PATH]`), paths-info (POST), and
file downloads (`[datasets/]ID/resolve/REV/PATH`, GET and HEAD, with `X-Repo-Commit`, `ETag`,
`Content-Length` and byte ranges). Errors carry the `X-Error-Code` header the Hub sends
(RepoNotFound, RevisionNotFound, EntryNotFound). Every request is logged, so a test can assert
that a file was never downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Repo:
    """One repository: files by commit, and branch or tag names pointing at commits. A private repo
    (`token` set) answers as the Hub does without the right `Authorization: Bearer` header: 401, RepoNotFound."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    token: str | None = None

    def commit(self, files: dict[str, bytes], *, branch: str = "main", tags: tuple[str, ...] = ()) -> str:
        """Add a commit holding exactly `files`; `branch` and `tags` point at it. Returns its sha."""
        digest = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode())
        digest.update(str(len(self.commits)).encode())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        for ref in (branch, *tags):
            self.refs[ref] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by its path relative to it."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class LocalHub:
    """The server: `repos[(repo_type, repo_id)]`, a request log, and the endpoint URL to put in HF_ENDPOINT."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._request = threading.local()  # the Authorization header of the request this thread serves
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos.setdefault((repo_type, repo_id), Repo())

    def requested(self, path_part: str) -> list[tuple[str, str, str]]:
        """Logged (method, path, range header) requests whose path contains `path_part`."""
        with self._lock:
            return [entry for entry in self.log if path_part in entry[1]]

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- request handling --------------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(request.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with self._lock:
            self.log.append((method, path, request.headers.get("Range") or ""))
        self._request.auth = request.headers.get("Authorization")
        body = b""
        if method == "POST":
            body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        try:
            if path.startswith("/api/"):
                status, headers, payload = self._api(path[len("/api/") :], query, method, body, request.headers)
            else:
                status, headers, payload = self._resolve(path.lstrip("/"), request.headers)
        except _NotFound as err:
            status, headers = err.status, {"X-Error-Code": err.code, "X-Error-Message": err.message}
            payload = json.dumps({"error": err.message}).encode()
            headers["Content-Type"] = "application/json"
        request.send_response(status)
        headers.setdefault("Content-Length", str(len(payload)))
        for key, value in headers.items():
            request.send_header(key, value)
        request.end_headers()
        if method != "HEAD":
            request.wfile.write(payload)

    def _find(self, repo_type: str, rest: str, marker: str | None) -> tuple[str, Repo, str | None, str]:
        """Split `ID[/marker/REV[/PATH]]` (ids have one slash at most) into repo id, repo, commit, path."""
        parts = rest.split("/")
        for n in (2, 1):
            repo_id = "/".join(parts[:n])
            if (repo_type, repo_id) in self.repos and (marker is None or parts[n : n + 1] == [marker]):
                repo, tail = self.repos[(repo_type, repo_id)], parts[n + 1 :] if marker else parts[n:]
                break
        else:
            raise _NotFound("RepoNotFound", f"Repository {rest.split('/' + (marker or ''))[0]} not found")
        if repo.token is not None and self._request.auth != f"Bearer {repo.token}":
            raise _NotFound("RepoNotFound", "Invalid username or password.", status=401)
        if marker is None:
            return repo_id, repo, None, ""
        # A revision may itself hold slashes (refs/pr/1): the longest prefix that resolves wins.
        for k in range(len(tail), 0, -1):
            sha = repo.resolve("/".join(tail[:k]))
            if sha is not None:
                return repo_id, repo, sha, "/".join(tail[k:])
        raise _NotFound("RevisionNotFound", f"Invalid rev id: {'/'.join(tail)}")

    def _api(self, rest: str, query: dict, method: str, body: bytes, headers) -> tuple[int, dict, bytes]:
        kind, _, rest = rest.partition("/")
        repo_type = {"models": "model", "datasets": "dataset"}.get(kind)
        if repo_type is None:
            raise _NotFound("RepoNotFound", f"unknown API {kind}")
        for marker in ("revision", "tree", "paths-info"):
            if re.search(rf"^[^/]+(/[^/]+)?/{marker}/", rest):
                break
        else:
            marker = None
        if marker is None:  # repo info at the default branch
            repo_id, repo, _, _ = self._find(repo_type, rest, None)
            if "main" not in repo.refs:
                raise _NotFound("RevisionNotFound", "Invalid rev id: main")
            return _json(self._info(repo_type, repo_id, repo, repo.refs["main"]))
        repo_id, repo, sha, sub = self._find(repo_type, rest, marker)
        if marker == "revision":
            return _json(self._info(repo_type, repo_id, repo, sha))
        files = repo.commits[sha]
        if marker == "paths-info":
            wanted = _form_or_json(body, headers).get("paths", [])
            wanted = [wanted] if isinstance(wanted, str) else wanted
            return _json([e for p in wanted for e in _entries(files, p.strip("/"), exact=True)])
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        if sub and sub not in files and not any(p.startswith(sub + "/") for p in files):
            raise _NotFound("EntryNotFound", f"{sub} does not exist on {sha}")
        return _json(_listing(files, sub, recursive))

    def _info(self, repo_type: str, repo_id: str, repo: Repo, sha: str) -> dict:
        files = repo.commits[sha]
        return {
            "_id": repo_id,
            "id": repo_id,
            "sha": sha,
            "private": False,
            "gated": False,
            "disabled": False,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [{"rfilename": p, "size": len(v), "blobId": _oid(v)} for p, v in sorted(files.items())],
            "cardData": {},
        }

    def _resolve(self, rest: str, headers) -> tuple[int, dict, bytes]:
        repo_type = "model"
        if rest.startswith("datasets/"):
            repo_type, rest = "dataset", rest[len("datasets/") :]
        _, repo, sha, path = self._find(repo_type, rest, "resolve")
        files = repo.commits[sha]
        if path not in files:
            raise _NotFound("EntryNotFound", f"{path} does not exist on {sha}")
        data = files[path]
        out = {"X-Repo-Commit": sha, "ETag": f'"{_oid(data)}"', "Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("Range", "") or "")
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
            out["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, out, data[start : end + 1]
        return 200, out, data


class _NotFound(Exception):
    def __init__(self, code: str, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _json(payload: object) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _form_or_json(body: bytes, headers) -> dict:
    if "json" in (headers.get("Content-Type") or ""):
        return json.loads(body or b"{}")
    return {k: v if len(v) > 1 else v[0] for k, v in parse_qs(body.decode()).items()}


def _file_entry(path: str, data: bytes) -> dict:
    return {"type": "file", "oid": _oid(data), "size": len(data), "path": path}


def _entries(files: dict[str, bytes], path: str, exact: bool) -> list[dict]:
    if path in files:
        return [_file_entry(path, files[path])]
    if any(p.startswith(path + "/") for p in files):
        return [{"type": "directory", "oid": _oid(path.encode()), "path": path}]
    return []


def _listing(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
    prefix = folder + "/" if folder else ""
    out, folders = [], set()
    for path, data in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        rel = path[len(prefix) :].split("/")
        for depth in range(1, len(rel)):
            sub = prefix + "/".join(rel[:depth])
            if sub not in folders and (recursive or depth == 1):
                folders.add(sub)
                out.append({"type": "directory", "oid": _oid(sub.encode()), "path": sub})
        if recursive or len(rel) == 1:
            out.append(_file_entry(path, data))
    return out

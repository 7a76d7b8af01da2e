"""A small Hugging Face Hub-compatible HTTP server for offline tests.

The real `huggingface_hub` client (and diffusers/transformers on top of it) talks to this server over HTTP, so
uploads, downloads, caching and error handling run the same code paths as against huggingface.co. Only the
endpoints that the client uses for repos, commits, git-LFS uploads and file downloads are implemented, and
repos live in memory. Xet storage is not implemented: tests set `HF_HUB_DISABLE_XET=1`, so the client uses the
git-LFS "basic" transfer for large files.

Usage:

    with HubServer(port, tokens={"hf_token": "alice"}) as hub:
        ...  # HF_ENDPOINT must point at hub.url before huggingface_hub is imported

A stopped server is a Hub that is down: connections are refused. Repos survive `stop()`/`start()`.
"""

import base64
import binascii
import hashlib
import itertools
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

DEFAULT_BRANCH = "main"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
# URL prefix of a repo of each type in web (non-API) URLs, e.g. /datasets/ns/name/resolve/...
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}

# Files the Hub stores in git-LFS: by extension (the Hub's default .gitattributes), by size, or when binary.
LFS_EXTENSIONS = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".msgpack", ".h5", ".npy", ".npz",
    ".pkl", ".pickle", ".model", ".gguf", ".zip", ".gz", ".tar", ".png", ".jpg", ".jpeg", ".webp",
)  # fmt: skip
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_EXTENSIONS).encode()

INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"  # the client keys on this exact text
_REPO_NAME = re.compile(r"[\w.-]{1,96}")


class HubError(Exception):
    """An error answer: status, message (JSON `error` and `X-Error-Message`), optional `X-Error-Code`."""

    def __init__(self, status: int, message: str, code: str | None = None, headers=None, extra=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.extra = extra or {}  # more JSON fields, e.g. the `url` of an existing repo on 409

    def to_response(self) -> "Response":
        # HTTP headers are latin-1: a path or revision from the request may not be.
        headers = {"X-Error-Message": self.message.encode("ascii", "replace").decode(), **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return json_response({"error": self.message, **self.extra}, self.status, headers)


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict = field(default_factory=dict)


def json_response(obj, status: int = 200, headers=None, content_type: str = "application/json") -> Response:
    return Response(status, json.dumps(obj).encode(), {"Content-Type": content_type, **(headers or {})})


@dataclass
class Request:
    params: dict
    headers: dict
    body: bytes
    user: str | None  # None: anonymous
    args: dict  # URL-decoded groups of the route pattern

    def json(self):
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as `oid`/ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class FileEntry:
    data: bytes
    blob_id: str  # git id of the content, or of the LFS pointer file for LFS files
    lfs_oid: str | None = None  # sha256 of the content, for LFS files
    pointer_size: int | None = None

    @classmethod
    def regular(cls, data: bytes) -> "FileEntry":
        return cls(data, git_blob_sha1(data))

    @classmethod
    def lfs(cls, data: bytes, oid: str) -> "FileEntry":
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()
        return cls(data, git_blob_sha1(pointer), oid, len(pointer))

    @property
    def etag(self) -> str:
        """What the client caches blobs under: the sha256 for LFS files, the git blob id otherwise."""
        return self.lfs_oid or self.blob_id

    def lfs_json(self, sha_key: str) -> dict | None:
        if self.lfs_oid is None:
            return None
        return {sha_key: self.lfs_oid, "size": len(self.data), "pointerSize": self.pointer_size}


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict  # path -> FileEntry: the full snapshot, so any old commit stays downloadable


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    refs: dict = field(default_factory=dict)  # "main", "v1", "refs/pr/1" -> commit sha
    commits: dict = field(default_factory=dict)  # sha -> Commit
    lfs_objects: dict = field(default_factory=dict)  # sha256 -> bytes (the repo's LFS storage)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        """A branch, `refs/heads/<branch>`, `refs/pr/<n>` or a full commit sha; None if unknown."""
        name = revision.removeprefix("refs/heads/")
        sha = self.refs.get(name) or (name if re.fullmatch(r"[0-9a-f]{40}", name) else None)
        return self.commits.get(sha) if sha else None

    def history(self, commit: Commit):
        """The commit and its ancestors, newest first."""
        while commit is not None:
            yield commit
            commit = self.commits.get(commit.parent)


class Hub:
    """The Hub's state and endpoint logic, independent of the HTTP plumbing."""

    def __init__(self, tokens: dict, url: str):
        self.tokens = dict(tokens)  # token -> user name
        self.url = url
        self.repos: dict = {}  # (repo_type, repo_id) -> Repo
        self.uploads: dict = {}  # upload ticket -> (Repo, oid, size): our stand-in for presigned S3 URLs
        self.requests: list = []  # (method, path, status) of every request, for tests to inspect
        self._lock = threading.Lock()
        self._counter = itertools.count()

    # -- plumbing ------------------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict, body: bytes) -> Response:
        url = urlsplit(raw_path)
        try:
            user = self._authenticate(headers.get("authorization"))
            route, args = self._route(method, url.path)
            request = Request(dict(parse_qsl(url.query)), headers, body, user, args)
            with self._lock:
                response = route(self, request)
        except HubError as error:
            response = error.to_response()
        with self._lock:
            self.requests.append((method, url.path, response.status))
        return response

    def _authenticate(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token not in self.tokens:
            # The Hub rejects a bad token on every endpoint, even for public reads.
            raise HubError(401, INVALID_TOKEN_MESSAGE)
        return self.tokens[token]

    def _route(self, method: str, path: str):
        for methods, pattern, route in ROUTES:
            match = pattern.fullmatch(path)
            if match and method in methods:
                args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                return route, args
        raise HubError(404, f"Sorry, we can't find the page you are looking for: {method} {path}")

    # -- repos and access control --------------------------------------------------------------------------

    @staticmethod
    def _repo_key(request: Request) -> tuple:
        if "types" in request.args:  # /api/{types}/{ns}/{name}/...
            repo_type = REPO_TYPES[request.args["types"]]
        else:  # web URLs: /[{prefix}/]{ns}/{name}/...
            repo_type = REPO_TYPES.get(request.args.get("prefix", "models"))
        return repo_type, f"{request.args['ns']}/{request.args['name']}"

    def _readable_repo(self, request: Request) -> Repo:
        repo = self.repos.get(self._repo_key(request))
        if repo is None or (repo.private and request.user != repo.namespace):
            # Like the Hub: a private repo looks missing; 401 asks an anonymous caller to log in.
            raise HubError(401 if request.user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, request: Request) -> Repo:
        if request.user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        repo = self._readable_repo(request)
        if request.user != repo.namespace:
            raise HubError(403, f"You don't have the rights to write to {repo.repo_id}")
        return repo

    @staticmethod
    def _commit_at(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def _new_commit(self, repo: Repo, parent: Commit | None, files: dict, header: dict, author: str) -> Commit:
        seed = f"{repo.repo_id}\n{parent and parent.sha}\n{sorted(files)}\n{next(self._counter)}\n{_now()}"
        commit = Commit(
            sha=hashlib.sha1(seed.encode()).hexdigest(),
            parent=parent.sha if parent else None,
            title=header.get("summary", ""),
            message=header.get("description", ""),
            author=author,
            date=_now(),
            files=files,
        )
        repo.commits[commit.sha] = commit
        return commit

    # -- endpoints -------------------------------------------------------------------------------------------

    def whoami(self, request: Request) -> Response:
        if request.user is None:
            raise HubError(401, INVALID_TOKEN_MESSAGE)
        token_info = {"displayName": "test token", "role": "write"}
        return json_response(
            {"type": "user", "name": request.user, "fullname": request.user, "orgs": [],
             "auth": {"type": "access_token", "accessToken": token_info}}
        )  # fmt: skip

    def create_repo(self, request: Request) -> Response:
        if request.user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        payload = request.json()
        name, namespace = payload.get("name", ""), payload.get("organization")
        if "/" in name:  # very old clients send "ns/name" as the name
            namespace, name = name.split("/", 1)
        namespace = namespace or request.user
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES or not _REPO_NAME.fullmatch(name):
            raise HubError(400, f"Invalid repo type or name: {repo_type!r} {name!r}")
        if namespace != request.user:
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}")
        key = (repo_type, f"{namespace}/{name}")
        if key in self.repos:
            # `create_repo(exist_ok=True)` relies on the 409; the Hub sends the repo's url with it.
            existing = self.repos[key]
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": self._repo_url(existing)})
        # huggingface_hub 1.x+ sends `visibility`; older releases (the project allows >=0.26) send `private`.
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_type, key[1], private, created_at=_now())
        # Like the Hub, a new repo has one commit with the .gitattributes that routes binaries to LFS.
        initial = self._new_commit(
            repo, None, {".gitattributes": FileEntry.regular(GITATTRIBUTES)}, {"summary": "initial commit"}, namespace
        )
        repo.refs[DEFAULT_BRANCH] = initial.sha
        self.repos[key] = repo
        return json_response({"url": self._repo_url(repo), "name": repo.repo_id, "id": repo.repo_id})

    def validate_yaml(self, request: Request) -> Response:
        # The client validates README.md metadata before committing; accept everything.
        return json_response({"errors": [], "warnings": []})

    def repo_info(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit = self._commit_at(repo, request.args.get("rev", DEFAULT_BRANCH))
        with_blobs = request.params.get("blobs", "").lower() == "true"
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(entry.data), blobId=entry.blob_id, lfs=entry.lfs_json("sha256"))
            siblings.append(sibling)
        return json_response(
            {
                "id": repo.repo_id,
                "author": repo.namespace,
                "sha": commit.sha,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(len(entry.data) for entry in commit.files.values()),
            }
        )

    def list_tree(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit = self._commit_at(repo, request.args["rev"])
        folder = request.args.get("path", "").strip("/")
        prefix = f"{folder}/" if folder else ""
        if folder and not any(path.startswith(prefix) for path in commit.files):
            raise HubError(404, f"Entry not found: {folder}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        recursive = request.params.get("recursive", "").lower() == "true"
        expand = request.params.get("expand", "").lower() == "true"

        entries = {}
        for path, entry in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                directory = prefix + "/".join(parts[:depth])
                entries.setdefault(directory, self._folder_json(repo, commit, directory, expand))
            if recursive or len(parts) == 1:
                entries[path] = self._file_json(repo, commit, path, entry, expand)
        return json_response(list(entries.values()))

    def _file_json(self, repo: Repo, commit: Commit, path: str, entry: FileEntry, expand: bool) -> dict:
        info = {"type": "file", "oid": entry.blob_id, "size": len(entry.data), "path": path}
        if entry.lfs_oid:
            info["lfs"] = entry.lfs_json("oid")
        if expand:
            info["lastCommit"] = self._last_commit(repo, commit, lambda files: files.get(path))
        return info

    def _folder_json(self, repo: Repo, commit: Commit, folder: str, expand: bool) -> dict:
        def snapshot(files):
            return sorted((path, entry.blob_id) for path, entry in files.items() if path.startswith(folder + "/"))

        info = {"type": "directory", "oid": hashlib.sha1(repr(snapshot(commit.files)).encode()).hexdigest()}
        info.update(size=0, path=folder)
        if expand:
            info["lastCommit"] = self._last_commit(repo, commit, snapshot)
        return info

    @staticmethod
    def _last_commit(repo: Repo, head: Commit, snapshot) -> dict:
        """The newest commit (from `head` back) that changed what `snapshot(files)` looks at."""
        commit = head
        while (parent := repo.commits.get(commit.parent)) and snapshot(parent.files) == snapshot(commit.files):
            commit = parent
        return {"id": commit.sha, "title": commit.title, "date": commit.date}

    def list_refs(self, request: Request) -> Response:
        repo = self._readable_repo(request)

        def ref_json(name: str, full_ref: str) -> dict:
            return {"name": name, "ref": full_ref, "targetCommit": repo.refs[name]}

        branches = [ref_json(name, f"refs/heads/{name}") for name in repo.refs if not name.startswith("refs/")]
        pulls = [ref_json(name, name) for name in repo.refs if name.startswith("refs/pr/")]
        return json_response({"branches": branches, "tags": [], "converts": [], "pullRequests": pulls})

    def list_commits(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        head = self._commit_at(repo, request.args["rev"])
        return json_response(
            [
                {"id": c.sha, "authors": [{"user": c.author}], "date": c.date, "title": c.title, "message": c.message}
                for c in repo.history(head)
            ]
        )

    def create_branch(self, request: Request) -> Response:
        repo = self._writable_repo(request)
        branch = request.args["branch"]
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit_at(repo, request.json().get("startingPoint") or DEFAULT_BRANCH)
        repo.refs[branch] = start.sha
        return json_response({})

    def preupload(self, request: Request) -> Response:
        repo = self._writable_repo(request)
        target = repo.resolve(request.args["rev"])
        current = target.files if target else {}
        files = []
        for item in request.json().get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            is_lfs = item["path"].lower().endswith(LFS_EXTENSIONS) or item["size"] >= LFS_MIN_SIZE or b"\0" in sample
            existing = current.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if is_lfs else "regular",
                    "shouldIgnore": False,
                    # The client skips files whose oid is unchanged (sha256 for LFS, git blob id otherwise).
                    "oid": existing.etag if existing else None,
                }
            )
        return json_response({"files": files})

    def lfs_batch(self, request: Request) -> Response:
        repo = self._writable_repo(request)
        payload = request.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS batch operation is supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            item = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs_objects:  # no `actions` tells the client the object is already stored
                ticket = secrets.token_hex(16)
                self.uploads[ticket] = (repo, oid, size)
                item["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{ticket}"},
                    "verify": {"href": f"{self._repo_url(repo)}.git/info/lfs/objects/verify"},
                }
            objects.append(item)
        return json_response({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_put(self, request: Request) -> Response:
        # Like a presigned S3 URL: the client sends no token, the unguessable ticket is the credential.
        upload = self.uploads.get(request.args["ticket"])
        if upload is None:
            raise HubError(403, "Unknown or expired upload URL")
        repo, oid, size = upload
        if len(request.body) != size:
            raise HubError(400, f"Size mismatch: expected {size} bytes, received {len(request.body)}")
        digest = hashlib.sha256(request.body).hexdigest()
        if digest != oid:
            raise HubError(400, f"sha256 mismatch: expected {oid}, received {digest}")
        repo.lfs_objects[oid] = request.body
        return Response(200, headers={"ETag": f'"{hashlib.md5(request.body).hexdigest()}"'})

    def lfs_verify(self, request: Request) -> Response:
        repo = self._writable_repo(request)
        payload = request.json()
        stored = repo.lfs_objects.get(payload.get("oid"))
        if stored is None or len(stored) != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
        return json_response({"success": True})

    def commit(self, request: Request) -> Response:
        repo = self._writable_repo(request)
        ref = request.args["rev"].removeprefix("refs/heads/")
        if ref not in repo.refs:  # commits go on a branch or a PR ref, never on a bare sha
            raise HubError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
        header, operations = self._parse_commit_payload(request.body)
        parent = repo.commits[repo.refs[ref]]
        files = self._apply_operations(repo, dict(parent.files), operations)
        commit = self._new_commit(repo, parent, files, header, request.user)
        commit_url = f"{self._repo_url(repo)}/commit/{commit.sha}"
        response = {"success": True, "commitOid": commit.sha, "commitUrl": commit_url}
        if request.params.get("create_pr") == "1":
            number = 1 + sum(name.startswith("refs/pr/") for name in repo.refs)
            repo.refs[f"refs/pr/{number}"] = commit.sha
            response["pullRequestUrl"] = f"{self._repo_url(repo)}/discussions/{number}"
        else:
            repo.refs[ref] = commit.sha
        return json_response(response)

    @staticmethod
    def _parse_commit_payload(body: bytes) -> tuple:
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Commit payload is not valid NDJSON") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        return lines[0]["value"], [(line.get("key"), line.get("value") or {}) for line in lines[1:]]

    @staticmethod
    def _apply_operations(repo: Repo, files: dict, operations: list) -> dict:
        for key, value in operations:
            path = value.get("path", "")
            if key == "file":
                try:
                    files[path] = FileEntry.regular(base64.b64decode(value.get("content", ""), validate=True))
                except binascii.Error:
                    raise HubError(400, f"Invalid base64 content for '{path}'") from None
            elif key == "lfsFile":
                data = repo.lfs_objects.get(value.get("oid"))
                if data is None:
                    raise HubError(400, f"LFS object {value.get('oid')} for '{path}' was never uploaded")
                if value.get("size", len(data)) != len(data):
                    raise HubError(400, f"LFS object for '{path}' has size {len(data)}, not {value['size']}")
                files[path] = FileEntry.lfs(data, value["oid"])
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    # The client appends a hint when it sees this exact text.
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [name for name in files if name.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for name in doomed:
                    del files[name]
            else:
                raise HubError(400, f"Unknown commit operation: {key!r}")
        return files

    def resolve_file(self, request: Request) -> Response:
        repo = self._readable_repo(request)
        commit = self._commit_at(repo, request.args["rev"])
        entry = commit.files.get(request.args["path"])
        if entry is None:
            # X-Repo-Commit lets the client cache the file's absence for this commit.
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.lfs_oid:
            headers.update({"X-Linked-Etag": f'"{entry.lfs_oid}"', "X-Linked-Size": str(len(entry.data))})
        return _ranged(entry.data, request.headers.get("range"), headers)


def _ranged(data: bytes, range_header: str | None, headers: dict) -> Response:
    """A 200 with all of `data`, or a 206 with the one byte range asked for.

    The client sends a Range to resume an interrupted download; HfFileSystem reads slices of files with one.
    """
    if not range_header:
        return Response(200, data, headers)
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header)
    size = len(data)
    if match is None or match.groups() == ("", ""):
        return Response(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
    start, end = match.groups()
    if start:
        first, last = int(start), min(int(end) if end else size - 1, size - 1)
    else:  # "bytes=-N": the last N bytes
        first, last = max(size - int(end), 0), size - 1
    if first > last:
        return Response(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
    return Response(206, data[first : last + 1], {**headers, "Content-Range": f"bytes {first}-{last}/{size}"})


_API_REPO = r"/api/(?P<types>models|datasets|spaces|kernels)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_WEB_REPO = r"/(?:(?P<prefix>datasets|spaces|kernels)/)?(?P<ns>[^/]+)/(?P<name>[^/]+?)"

ROUTES = [
    (methods, re.compile(pattern), route)
    for methods, pattern, route in [
        (("GET",), r"/api/whoami-v2", Hub.whoami),
        (("POST",), r"/api/repos/create", Hub.create_repo),
        (("POST",), r"/api/validate-yaml", Hub.validate_yaml),
        (("GET",), _API_REPO, Hub.repo_info),
        (("GET",), _API_REPO + r"/revision/(?P<rev>[^/]+)", Hub.repo_info),
        (("GET",), _API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", Hub.list_tree),
        (("GET",), _API_REPO + r"/refs", Hub.list_refs),
        (("GET",), _API_REPO + r"/commits/(?P<rev>[^/]+)", Hub.list_commits),
        (("POST",), _API_REPO + r"/branch/(?P<branch>[^/]+)", Hub.create_branch),
        (("POST",), _API_REPO + r"/preupload/(?P<rev>[^/]+)", Hub.preupload),
        (("POST",), _API_REPO + r"/commit/(?P<rev>[^/]+)", Hub.commit),
        (("POST",), _WEB_REPO + r"\.git/info/lfs/objects/batch", Hub.lfs_batch),
        (("POST",), _WEB_REPO + r"\.git/info/lfs/objects/verify", Hub.lfs_verify),
        (("PUT",), r"/lfs-upload/(?P<ticket>[0-9a-f]+)", Hub.lfs_put),
        (("GET", "HEAD"), _WEB_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", Hub.resolve_file),
    ]
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            # huggingface_hub always sends a Content-Length; refuse rather than misread a chunked body.
            response = HubError(411, "Length Required: chunked request bodies are not supported").to_response()
        else:
            # Always drain the body, even to refuse the request: answering early breaks the client's upload.
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {key.lower(): value for key, value in self.headers.items()}
            response = self.server.hub.handle(self.command, self.path, headers, body)
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        # One request per connection: no pooled connection outlives stop(), so a stopped Hub is really down.
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = _serve

    def log_message(self, format, *args) -> None:
        pass  # keep test output clean; `HubServer.requests` records every request instead


class HubServer:
    """Runs a `Hub` on 127.0.0.1:`port` in a background thread.

    `tokens` maps each accepted token to its user name; a user can write only to repos in its own namespace.
    """

    def __init__(self, port: int = 0, tokens: dict | None = None, host: str = "127.0.0.1"):
        self.host, self.port = host, port
        self.hub = Hub(tokens or {}, url=f"http://{host}:{port}")
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.hub.url

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def requests(self) -> list:
        """(method, path, status) of every request served so far, oldest first."""
        return self.hub.requests

    def start(self) -> "HubServer":
        if self.running:
            raise RuntimeError(f"Hub server already running at {self.url}")
        self._httpd = ThreadingHTTPServer((self.host, self.port), _Handler)
        self._httpd.hub = self.hub
        self.port = self._httpd.server_address[1]  # the real port when 0 asked for any free one
        self.hub.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self.running:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

"""The local Hub server (tests/hub_server.py) against the real `huggingface_hub` client over HTTP."""

import hashlib
import json
import os
import time
import urllib.error
import urllib.request

import pytest
from huggingface_hub import (
    HfApi,
    create_branch,
    create_repo,
    hf_hub_download,
    list_repo_files,
    model_info,
    snapshot_download,
    upload_file,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from hub_fixtures import HUB_TOKEN, HUB_USER, OTHER_TOKEN, hub_repo_id, hub_server  # noqa: F401

CONFIG = b'{"hidden_size": 8}\n'
README = b"---\nlicense: apache-2.0\n---\n# Test model\n"
WEIGHTS = os.urandom(1_500_000)  # > 1 MB and .safetensors: goes through the LFS upload path


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "README.md").write_bytes(README)
    (folder / "unet" / "model.safetensors").write_bytes(WEIGHTS)
    return folder


@pytest.fixture
def pushed_repo(hub_repo_id, model_folder):
    """A repo with one commit of `model_folder` on main; returns (repo_id, commit sha)."""
    create_repo(hub_repo_id)
    commit = upload_folder(repo_id=hub_repo_id, folder_path=model_folder, commit_message="add model")
    return hub_repo_id, commit.oid


def raw_request(method, url, body=None, token=HUB_TOKEN, headers=None):
    """A plain HTTP call, outside the client, sending exactly what the test needs. Returns (status, body)."""
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)):
        body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def lfs_commit(content):
    """The NDJSON body of a commit adding `content` as an LFS file, as the client would send it."""
    lines = [
        {"key": "header", "value": {"summary": "add weights", "description": ""}},
        {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256",
                                     "oid": hashlib.sha256(content).hexdigest(), "size": len(content)}},
    ]  # fmt: skip
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def test_upload_folder_and_download_back_byte_identical(hub_server, pushed_repo, tmp_path):
    repo_id, sha = pushed_repo
    paths = ["config.json", "README.md", "unet/model.safetensors"]
    assert sorted(list_repo_files(repo_id)) == sorted([".gitattributes", *paths])

    # The weights went through git-LFS: batch call, then a PUT of the bytes to the returned href.
    calls = [(method, path) for method, path, status in hub_server.requests if status == 200]
    assert ("POST", f"/{repo_id}.git/info/lfs/objects/batch") in calls
    assert any(method == "PUT" and path.startswith("/lfs-upload/") for method, path in calls)

    info = model_info(repo_id, files_metadata=True)
    assert info.sha == sha
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["unet/model.safetensors"].sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert lfs["config.json"] is None

    expected = {"config.json": CONFIG, "README.md": README, "unet/model.safetensors": WEIGHTS}
    for path, content in expected.items():
        with open(hf_hub_download(repo_id, path, cache_dir=tmp_path / "files"), "rb") as f:
            assert f.read() == content

    snapshot = snapshot_download(repo_id, cache_dir=tmp_path / "snapshot")
    assert snapshot.endswith(sha)
    for path, content in expected.items():
        with open(os.path.join(snapshot, path), "rb") as f:
            assert f.read() == content


def test_second_commit_keeps_the_old_revision_downloadable(pushed_repo, tmp_path):
    repo_id, first_sha = pushed_repo
    new_weights = os.urandom(2048)
    second = upload_file(path_or_fileobj=new_weights, path_in_repo="unet/model.safetensors", repo_id=repo_id)
    assert second.oid != first_sha

    latest = hf_hub_download(repo_id, "unet/model.safetensors", cache_dir=tmp_path / "latest")
    old = hf_hub_download(repo_id, "unet/model.safetensors", revision=first_sha, cache_dir=tmp_path / "old")
    with open(latest, "rb") as f_latest, open(old, "rb") as f_old:
        assert (f_latest.read(), f_old.read()) == (new_weights, WEIGHTS)

    commits = HfApi().list_repo_commits(repo_id)
    assert [c.commit_id for c in commits[:2]] == [second.oid, first_sha]
    assert commits[0].title == "Upload unet/model.safetensors with huggingface_hub"


def test_unchanged_files_are_not_committed_again(pushed_repo, model_folder):
    repo_id, sha = pushed_repo
    # The preupload answer carries each file's remote oid; the client drops unchanged files and skips the commit.
    again = upload_folder(repo_id=repo_id, folder_path=model_folder)
    assert again.oid == sha


def test_branch_and_pull_request_revisions(pushed_repo, tmp_path):
    repo_id, main_sha = pushed_repo
    create_branch(repo_id, branch="v1")
    create_branch(repo_id, branch="v1", exist_ok=True)  # the 409 is swallowed
    upload_file(path_or_fileobj=b"v1 config", path_in_repo="config.json", repo_id=repo_id, revision="v1")
    pr = upload_file(path_or_fileobj=b"pr config", path_in_repo="config.json", repo_id=repo_id, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"

    def config_at(revision):
        with open(hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=tmp_path), "rb") as f:
            return f.read()

    assert config_at("v1") == b"v1 config"
    assert config_at("refs/pr/1") == b"pr config"
    assert config_at("main") == CONFIG
    assert model_info(repo_id).sha == main_sha
    refs = HfApi().list_repo_refs(repo_id, include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "v1"}
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]


def test_tree_listing(pushed_repo):
    repo_id, sha = pushed_repo
    top = {entry.path: entry for entry in HfApi().list_repo_tree(repo_id, expand=True)}
    assert sorted(top) == [".gitattributes", "README.md", "config.json", "unet"]
    assert top["unet"].last_commit.oid == sha
    assert top[".gitattributes"].last_commit.title == "initial commit"
    (weights,) = HfApi().list_repo_tree(repo_id, path_in_repo="unet")
    assert (weights.path, weights.size, weights.lfs.sha256) == (
        "unet/model.safetensors",
        len(WEIGHTS),
        hashlib.sha256(WEIGHTS).hexdigest(),
    )


def test_range_request(hub_server, pushed_repo):
    repo_id, _ = pushed_repo
    url = f"{hub_server.url}/{repo_id}/resolve/main/unet/model.safetensors"
    assert raw_request("GET", url, headers={"Range": "bytes=10-19"}) == (206, WEIGHTS[10:20])
    assert raw_request("GET", url, headers={"Range": "bytes=-5"}) == (206, WEIGHTS[-5:])


def test_create_repo_conflict_and_exist_ok(hub_repo_id):
    url = create_repo(hub_repo_id)
    assert url.repo_id == hub_repo_id
    assert create_repo(hub_repo_id, exist_ok=True).repo_id == hub_repo_id
    with pytest.raises(HfHubHTTPError) as excinfo:
        create_repo(hub_repo_id)
    assert excinfo.value.response.status_code == 409


def test_wrong_token_gets_401(pushed_repo, tmp_path):
    repo_id, _ = pushed_repo
    api = HfApi(token="hf_wrong_token")
    # Not a RepositoryNotFoundError: the client keys on the Hub's "Invalid credentials" message.
    for call in (
        lambda: api.model_info(repo_id),
        lambda: api.whoami(),
        lambda: hf_hub_download(repo_id, "config.json", token="hf_wrong_token", cache_dir=tmp_path),
    ):
        with pytest.raises(HfHubHTTPError) as excinfo:
            call()
        assert not isinstance(excinfo.value, RepositoryNotFoundError)
        assert excinfo.value.response.status_code == 401
    assert HfApi().whoami()["name"] == HUB_USER


def test_missing_repo_revision_and_file(pushed_repo, tmp_path):
    repo_id, _ = pushed_repo
    with pytest.raises(RepositoryNotFoundError) as excinfo:
        hf_hub_download(f"{HUB_USER}/does-not-exist", "config.json", cache_dir=tmp_path)
    assert excinfo.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        model_info(f"{HUB_USER}/does-not-exist")

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        model_info(repo_id, revision="0" * 40)

    with pytest.raises(EntryNotFoundError) as excinfo:
        hf_hub_download(repo_id, "missing.json", cache_dir=tmp_path)
    assert excinfo.value.response.status_code == 404


def test_private_repo_is_hidden_from_others(hub_repo_id, tmp_path):
    create_repo(hub_repo_id, private=True)
    upload_file(path_or_fileobj=CONFIG, path_in_repo="config.json", repo_id=hub_repo_id)
    assert model_info(hub_repo_id).private is True

    for token, status in ((False, 401), (OTHER_TOKEN, 404)):
        with pytest.raises(RepositoryNotFoundError) as excinfo:
            hf_hub_download(hub_repo_id, "config.json", token=token, cache_dir=tmp_path)
        assert excinfo.value.response.status_code == status


def test_public_repo_is_readable_anonymously_but_not_writable_by_others(pushed_repo, tmp_path):
    repo_id, _ = pushed_repo
    path = hf_hub_download(repo_id, "config.json", token=False, cache_dir=tmp_path)
    with open(path, "rb") as f:
        assert f.read() == CONFIG
    with pytest.raises(HfHubHTTPError) as excinfo:
        upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, token=OTHER_TOKEN)
    assert excinfo.value.response.status_code == 403


def test_commit_referencing_a_never_uploaded_lfs_object_is_rejected(hub_server, pushed_repo):
    repo_id, sha = pushed_repo
    url = f"{hub_server.url}/api/models/{repo_id}/commit/main"
    status, answer = raw_request("POST", url, lfs_commit(os.urandom(1000)))
    assert status == 400
    assert "never uploaded" in json.loads(answer)["error"]
    assert model_info(repo_id).sha == sha  # main did not move


def test_lfs_put_with_wrong_content_is_rejected(hub_server, pushed_repo):
    repo_id, _ = pushed_repo
    announced, sent = os.urandom(1000), os.urandom(1000)
    oid = hashlib.sha256(announced).hexdigest()
    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 1000}]}
    status, answer = raw_request("POST", f"{hub_server.url}/{repo_id}.git/info/lfs/objects/batch", batch)
    assert status == 200
    href = json.loads(answer)["objects"][0]["actions"]["upload"]["href"]

    status, answer = raw_request("PUT", href, sent, token=None)
    assert status == 400 and "sha256 mismatch" in json.loads(answer)["error"]
    status, answer = raw_request("PUT", href, announced[:-1], token=None)
    assert status == 400 and "Size mismatch" in json.loads(answer)["error"]

    # Nothing was stored, so a commit that references the object is refused.
    status, _ = raw_request("POST", f"{hub_server.url}/api/models/{repo_id}/commit/main", lfs_commit(announced))
    assert status == 400


def test_stopped_server_is_a_hub_that_is_down(hub_server, pushed_repo, tmp_path, monkeypatch):
    repo_id, sha = pushed_repo
    cached = hf_hub_download(repo_id, "config.json", cache_dir=tmp_path)
    hub_server.stop()
    try:
        # A cached file is served from the cache at once, after one refused HEAD call.
        assert hf_hub_download(repo_id, "config.json", cache_dir=tmp_path) == cached
        # For a file not in the cache the client retries the HEAD call 5 times with backoff (about 23 s of
        # sleeping) before giving up: skip the waits.
        monkeypatch.setattr(time, "sleep", lambda seconds: None)
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(repo_id, "README.md", cache_dir=tmp_path)
    finally:
        hub_server.start()
    assert model_info(repo_id).sha == sha  # repos survive a restart

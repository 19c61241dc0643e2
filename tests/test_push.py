"""`vlmcompress.push`: a real `apply` output published to a fake Hub (tests/hub_server.py) over the LFS protocol."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hub_server import FakeHub, Repo

import vlmcompress
from vlmcompress.publish import PushError, format_result, push

TOKEN = "hf_FakeTokenForPushTests0123456789abcdef"
REPO = "my-org/clip-small-tome"
# excluded files written into each test's copy of the output: none of them may be listed, uploaded or touched
JUNK = (".hidden", ".git/config", "__pycache__/modeling_vlmcompress.cpython-311.pyc", "stale.pyc", "shard.tmp",
        "onnx/.DS_Store", "out.vlmcompress-work/lock")
EXTRA = "onnx/model.onnx"  # a subfolder's file is uploaded under its relative path
EXTRA_BYTES = b"\x08\x07onnx-bytes" * 100


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("push") / "out"
    vlmcompress.apply({"model": "shapes-clip-small", "output": str(out),
                       "stages": [{"method": "token_reduce", "r": 2}]}, progress=False)
    return out


@pytest.fixture
def folder(built, tmp_path) -> Path:
    """A private copy of the output (tests add files and links to it), with junk and one nested file."""
    out = tmp_path / "out"
    shutil.copytree(built, out)
    for junk in JUNK:
        (out / junk).parent.mkdir(parents=True, exist_ok=True)
        (out / junk).write_bytes(b"junk")
    (out / EXTRA).write_bytes(EXTRA_BYTES)
    return out


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The fake Hub, with huggingface_hub pointed at it. huggingface_hub reads its settings once, at import (and
    tests/conftest.py imported it offline), so the module constants are patched along with the environment."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent, _http

    server = FakeHub(TOKEN).start()
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # the LFS protocol, which the fake implements (not Xet)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    # the user-agent's agent detection fetches a registry from the Hub once per process: not from these tests
    monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    # huggingface_hub retries a failed upload 5 times with 1-8 s sleeps in between: keep the retries, not the wait
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    yield server
    server.stop()
    _http.close_session()  # pooled connections to this server's port


def expected_files(built: Path) -> list[tuple[str, int]]:
    files = [(p.relative_to(built).as_posix(), p.stat().st_size) for p in built.rglob("*") if p.is_file()]
    return sorted([*files, (EXTRA, len(EXTRA_BYTES))])


def snapshot(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns, p.lstat().st_size)
                  for p in folder.rglob("*"))


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(PushError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and TOKEN not in message, message
    return message


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# dry run


def test_dry_run_lists_the_files_and_sends_nothing(built, folder, hub, monkeypatch):
    def no_connections(self, address):
        raise AssertionError(f"dry run connected to {address}")

    monkeypatch.setattr(socket.socket, "connect", no_connections)
    before = snapshot(folder)
    result = push(folder, REPO, dry_run=True)
    assert result.files == expected_files(built)
    assert result.dry_run and not result.created_repo and result.commit_url is None
    assert result.commit_message == f"Upload out compressed with vlmcompress {vlmcompress.__version__}"
    assert hub.requests == [] and snapshot(folder) == before

    lines = format_result(result)
    assert lines[-1] == f"commit message: {result.commit_message}"
    listed = [line.split() for line in lines[1:-1]]
    assert [(path, int(size.replace(",", ""))) for path, size in listed] == result.files
    assert all(line.startswith("  ") for line in lines[1:-1])


def test_dry_run_needs_no_token_but_checks_the_folder(folder, hub):
    (folder / "config.json").unlink()
    assert "config.json" in error_of(push, folder, REPO, dry_run=True)
    assert hub.requests == []


# ---------------------------------------------------------------------------------------------------------------
# a real push


def check_token_only_in_authorization(hub: FakeHub) -> None:
    assert hub.requests
    for request in hub.requests:
        assert TOKEN not in request.path and TOKEN.encode() not in request.body, request.path
        for key, value in request.headers.items():
            assert TOKEN not in value or key.lower() == "authorization", (request.path, key)


def test_push_uploads_the_folder_in_one_commit(built, folder, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = push(folder, REPO, commit_message="Add the ToMe r=2 model")
    expected = expected_files(built)

    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit.repo_id, commit.revision, commit.summary, commit.create_pr) == \
           (REPO, "main", "Add the ToMe r=2 model", False)
    assert sorted([*commit.files, *commit.lfs_files]) == [path for path, _ in expected]
    assert "model.safetensors" in commit.lfs_files and "config.json" in commit.files
    for path, content in commit.files.items():
        assert content == (folder / path).read_bytes(), path
    stored = hub.lfs_sha256()
    for path, entry in commit.lfs_files.items():
        assert entry["oid"] == sha256(folder / path) == stored[entry["oid"]], path
        assert entry["size"] == (folder / path).stat().st_size
    assert hub.repos[REPO].private is None  # without --private the namespace's default applies

    assert result.repo_id == REPO and result.files == expected and result.created_repo and not result.dry_run
    assert result.commit_url.startswith(f"{hub.url}/{REPO}/commit/")
    assert format_result(result)[0] == f"pushed {len(expected)} files to {REPO}: {result.commit_url}"

    check_token_only_in_authorization(hub)
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert all("authorization" not in r.headers for r in hub.requests if r.method == "PUT")  # LFS storage
    for path in folder.rglob("*"):
        assert path.is_dir() or TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in repr(result)


def test_push_again_reuses_the_repository_and_the_token_argument_wins(folder, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_someOtherTokenThatTheHubRejects")
    first = push(folder, REPO, token=TOKEN, private=True)
    uploads = sum(r.method == "PUT" for r in hub.requests)
    second = push(folder, REPO, token=TOKEN)
    assert first.created_repo and not second.created_repo and hub.repos[REPO].private is True
    assert len(hub.commits) == 2 and sum(r.method == "PUT" for r in hub.requests) == uploads  # LFS: known objects
    check_token_only_in_authorization(hub)


def test_push_to_a_branch_and_as_a_pull_request(folder, hub):
    on_branch = push(folder, REPO, token=TOKEN, revision="tome-r2")
    assert "tome-r2" in hub.repos[REPO].branches and hub.commits[-1].revision == "tome-r2"
    assert on_branch.pr_url is None
    pr = push(folder, REPO, token=TOKEN, create_pr=True)
    assert hub.commits[-1].create_pr and pr.pr_url and f"pull request: {pr.pr_url}" in format_result(pr)


def test_a_name_alone_goes_to_the_token_owner(folder, hub):
    result = push(folder, "clip-small-tome", token=TOKEN)
    assert result.repo_id == "alice/clip-small-tome" and hub.commits[0].repo_id == "alice/clip-small-tome"


# ---------------------------------------------------------------------------------------------------------------
# errors: one line each, never the token


def test_no_token(folder, hub):
    message = error_of(push, folder, REPO)
    assert "no Hugging Face token" in message and "HF_TOKEN" in message and "hf auth login" in message
    assert hub.requests == []


def test_rejected_token(folder, hub):
    wrong = "hf_wrongTokenXYZ0123456789"
    message = error_of(push, folder, REPO, token=wrong)
    assert "token was rejected" in message and "401" in message and wrong not in message
    assert hub.repos == {}


def test_rejected_token_from_the_whoami_answer(folder, hub):
    hub.fail.add("whoami_401")
    assert "token was rejected" in error_of(push, folder, REPO, token=TOKEN)
    assert hub.repos == {}


def test_read_only_token(folder, hub):
    hub.role = "read"
    assert f"cannot write to {REPO}: it is a read-only token" in error_of(push, folder, REPO, token=TOKEN)
    assert hub.repos == {}


@pytest.mark.parametrize("exists", [False, True], ids=["created-by-this-push", "existing-repo"])
def test_no_write_permission_on_commit(folder, hub, exists):
    if exists:
        hub.repos[REPO] = Repo(private=False)
    hub.fail.add("commit_403")
    message = error_of(push, folder, REPO, token=TOKEN)
    assert f"the token cannot write to {REPO}" in message and "403" in message
    remains = f"the empty repository {REPO} that this call created remains (delete it on the Hub or push again)"
    assert (remains in message) is not exists
    assert hub.commits == []


def test_no_permission_to_create_the_repository(folder, hub):
    hub.fail.add("create_403")
    message = error_of(push, folder, REPO, token=TOKEN)
    assert f"the token cannot write to {REPO}" in message and "created" not in message


def test_connection_lost_during_the_upload(folder, hub):
    hub.fail.add("lfs_close")
    message = error_of(push, folder, REPO, token=TOKEN)
    assert message.startswith(f"could not reach the Hub at {hub.url}: ")
    assert f"the empty repository {REPO} that this call created remains" in message
    assert hub.commits == []  # no commit with part of the files


def test_hub_down(folder, hub, monkeypatch):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    message = error_of(push, folder, REPO, token=TOKEN)
    assert message.startswith(f"could not reach the Hub at http://127.0.0.1:{port}: ")


def test_offline_mode(folder, hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "offline mode is on (HF_HUB_OFFLINE)" in error_of(push, folder, REPO, token=TOKEN)
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["a/b/c", "has space", "x--y", "name.git", ""])
def test_invalid_repo_id(folder, hub, repo_id):
    message = error_of(push, folder, repo_id, token=TOKEN)
    assert message.startswith(f"invalid repository id {repo_id!r}") and "ORG/NAME" in message
    assert hub.requests == []


def broken_card(folder: Path) -> None:
    (folder / "README.md").write_text("---\nbase_model: [unclosed\n---\n# card\n")


def wrong_model_type(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "bert"}')


@pytest.mark.parametrize("damage, expected", [
    (lambda f: (f / "config.json").unlink(), "has no config.json"),
    (lambda f: (f / "README.md").unlink(), "has no README.md (the model card)"),
    (lambda f: shutil.rmtree(f), "does not exist"),
    (broken_card, "does not parse"),
    (wrong_model_type, "does not reload as a vlmcompress checkpoint"),
], ids=["no-config", "no-card", "missing-folder", "broken-card", "not-vlmcompress"])
def test_not_an_apply_output(folder, hub, damage, expected):
    damage(folder)
    message = error_of(push, folder, REPO, token=TOKEN)
    assert expected in message and str(folder) in message
    assert hub.requests == []


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "push"])
def test_symlinks_are_refused(folder, hub, tmp_path, dry_run):
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the Hub")
    (folder / "onnx" / "weights.bin").symlink_to(outside)
    message = error_of(push, folder, REPO, token=TOKEN, dry_run=dry_run)
    assert "onnx/weights.bin' is a symbolic link" in message and "never follows links" in message
    assert hub.requests == []


# ---------------------------------------------------------------------------------------------------------------
# the package face


def test_push_is_a_top_level_name_that_imports_no_torch():
    code = ("import sys, vlmcompress\nfunction = vlmcompress.push\nmodule = sys.modules['vlmcompress.publish']\n"
            "assert function is module.push and callable(function), function\n"
            "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_base_model_goes_into_the_uploaded_card_only(folder, hub):
    """`--base-model` names the Hub source of an output compressed from a local copy: the uploaded card carries
    it (with the relation the stages imply); the folder's README.md is not changed."""
    from huggingface_hub import ModelCard

    before = (folder / "README.md").read_bytes()
    dry = push(folder, REPO, dry_run=True, base_model="openai/clip-vit-base-patch32")
    push(folder, REPO, token=TOKEN, base_model="openai/clip-vit-base-patch32")
    uploaded = hub.commits[-1].files["README.md"]
    card = ModelCard(uploaded.decode())
    assert card.data.base_model == "openai/clip-vit-base-patch32"
    assert "base_model_relation" not in card.data.to_dict()  # token reduction alone changes no weight
    assert dict(dry.files)["README.md"] == len(uploaded)
    assert (folder / "README.md").read_bytes() == before
    with pytest.raises(PushError):
        push(folder, REPO, dry_run=True, base_model="not a repo id")

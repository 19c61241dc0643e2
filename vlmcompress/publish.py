"""Publish a `vlmcompress apply` output folder to the Hugging Face Hub, as one commit.

    from vlmcompress.publish import push, format_result
    result = push("out/tiny-clip-tome", "my-org/tiny-clip-tome", dry_run=True)   # what would be sent, no network
    print("\\n".join(format_result(result)))

Before anything is sent the folder is checked (it exists, has `config.json` and a model card that parses, and its
model rebuilds from `config.json` on the meta device, with the installed classes: no code from the folder runs).
All files go up in a single `create_commit`, so a failure never leaves a commit with part of the folder. Files that
are already in the repository but not in the folder stay there.

The token is never written into a message: every error raised here is one line with the token replaced by `***`.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import VlmCompressError

T = TypeVar("T")

# Never uploaded: caches, editor and VCS files, leftovers of interrupted writes, and an `apply` run's work folder
# (`<output>.vlmcompress-work`, normally beside the output; excluded wherever it appears).
EXCLUDED_PATTERNS = (".*", "__pycache__", "*.pyc", "*.tmp", "*.vlmcompress-work")
REQUIRED_FILES = ("config.json", "README.md")


class PushError(VlmCompressError):
    """A folder that cannot be published, or a Hub request that failed (one line, never the token)."""


@dataclass
class PushResult:
    """What `push` sent (or, with `dry_run`, would send)."""

    repo_id: str
    files: list[tuple[str, int]]  # (path in the repository, size in bytes), sorted by path
    commit_message: str
    created_repo: bool = False
    commit_url: str | None = None
    dry_run: bool = False
    pr_url: str | None = None  # with `create_pr`: the pull request that holds the commit


@dataclass
class _Target:
    """Where a real push goes, and what an error message needs to know about it."""

    endpoint: str
    repo_id: str
    token: str
    revision: str | None = None
    created_repo: bool = False  # set once this push has created the repository


# --- local checks (also the whole of a dry run) ---------------------------------------------------------------------


def is_excluded(name: str) -> bool:
    """Whether a file or folder called `name` stays out of the upload (anything under an excluded folder too)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in EXCLUDED_PATTERNS)


def list_files(folder: Path) -> list[tuple[str, int]]:
    """`[(posix path relative to folder, size)]` of every file to upload. Symbolic links are refused, not followed:
    one could point anywhere on the machine, and the Hub would get that file's content under an innocent name."""
    found: list[tuple[str, int]] = []
    pending = [folder]
    while pending:
        here = pending.pop()
        with os.scandir(here) as entries:
            for entry in entries:
                if is_excluded(entry.name):
                    continue
                path = Path(entry.path)
                if entry.is_symlink():
                    raise PushError(f"'{path}' is a symbolic link; push uploads only regular files inside the folder "
                                    "and never follows links; replace it with a copy of its target, or remove it")
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif entry.is_file(follow_symlinks=False):
                    found.append((path.relative_to(folder).as_posix(), entry.stat(follow_symlinks=False).st_size))
                else:
                    raise PushError(f"'{path}' is not a regular file (a device, socket or pipe); expected only files "
                                    "and folders in an output of `vlmcompress apply`; remove it and push again")
    return sorted(found)


def check_folder(folder: Path) -> list[tuple[str, int]]:
    """The files to upload, once the folder is known to be a complete `vlmcompress apply` output."""
    if not folder.exists():
        raise PushError(f"'{folder}' does not exist; expected the output folder of `vlmcompress apply`")
    if not folder.is_dir():
        raise PushError(f"'{folder}' is a file, not a folder; expected the output folder of `vlmcompress apply`")
    files = list_files(folder)  # first: refuse links before anything below reads through one
    names = {path for path, _ in files}
    for required in REQUIRED_FILES:
        if required not in names:
            what = "the model card" if required == "README.md" else "the model's configuration"
            raise PushError(f"'{folder}' has no {required} ({what}); expected a folder written by "
                            "`vlmcompress apply`; run apply again, or push its output folder")
    _check_card(folder / "README.md")
    _check_reloads(folder)
    return files


def _check_card(card: Path) -> None:
    """The Hub reads the card's YAML block for the model page: a broken one is better caught here than there."""
    from huggingface_hub import ModelCard

    try:
        ModelCard.load(card)  # an existing file path: read locally, never looked up on the Hub
    except Exception as e:  # yaml, decoding and metadata errors all mean the same thing to the user
        raise PushError(f"the model card '{card}' does not parse ({_one_line(str(e)) or type(e).__name__}); "
                        "expected Markdown that starts with a YAML block between '---' lines; fix it, or run "
                        "`vlmcompress apply` again to rewrite it") from None


def _check_reloads(folder: Path) -> None:
    """Build the model on the meta device from `config.json` with the installed classes (cheap, runs no code
    from the folder): a folder that does not reload here would not load for whoever downloads it either."""
    from .checkpoint import load  # torch and transformers: only once a push actually gets this far

    try:
        load(folder, meta=True)
    except Exception as e:  # ModelLoadError for the known cases; anything else from transformers means the same
        raise PushError(f"'{folder}' does not reload as a vlmcompress checkpoint ({_one_line(str(e))[:300]}); "
                        "push only publishes complete outputs of `vlmcompress apply`; run apply again") from None


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"invalid repository id {repo_id!r} ({_one_line(str(e))}); expected NAME or ORG/NAME, "
                        "for example my-org/clip-small-tome") from None


def default_commit_message(folder: Path) -> str:
    return f"Upload {folder.resolve().name} compressed with vlmcompress {_version()}"


def _version() -> str:
    import sys
    from importlib.metadata import PackageNotFoundError, version

    found = getattr(sys.modules.get(__package__ or "vlmcompress"), "__version__", None)
    if found:
        return str(found)
    try:
        return version("vlmcompress")
    except PackageNotFoundError:
        return "(unknown version)"


# --- the token and the endpoint -------------------------------------------------------------------------------------


def resolve_token(token: str | None) -> str | None:
    """The `token` argument, else `HF_TOKEN`, else the token saved by `hf auth login`."""
    token = (token or os.environ.get("HF_TOKEN") or "").strip()
    if token:
        return token
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception as e:  # an opted-in OIDC exchange can fail; its text could hold a credential, so say little
        raise PushError(f"could not read the saved Hugging Face login ({type(e).__name__}); run `hf auth login` "
                        "or set HF_TOKEN") from None


def hub_endpoint() -> str:
    """`HF_ENDPOINT` read now (huggingface_hub reads it once, at import), else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or "").strip().rstrip("/") or constants.ENDPOINT


def scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _one_line(text: str) -> str:
    """Hub errors span several lines (status, URL, request id, hints): one line for the CLI."""
    return " ".join(text.split())


# --- turning huggingface_hub / HTTP errors into one line each -------------------------------------------------------


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes: huggingface_hub wraps a failed LFS upload in a RuntimeError raised `from` the
    network error, so the reason is further down."""
    seen: list[BaseException] = []
    while exc is not None and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Transport failures of whichever HTTP client this huggingface_hub uses (httpx2 for 2.x, httpx for 1.x), plus
    the builtins they and the hub's offline mode (`OfflineModeIsEnabled` is a ConnectionError) derive from."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for client in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _status(exc: BaseException) -> int | None:
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if response is not None and isinstance(getattr(response, "status_code", None), int):
            return response.status_code
    return None


def _explain(exc: BaseException, doing: str, target: _Target) -> str:
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    chain = _chain(exc)
    hub = target.endpoint
    for e in chain:
        if isinstance(e, OfflineModeIsEnabled):
            return f"could not reach the Hub at {hub}: offline mode is on (HF_HUB_OFFLINE); unset it and push again"
    network = _network_error_types()
    for e in chain:
        if isinstance(e, network):
            reason = _one_line(str(e))[:200].rstrip(".") or type(e).__name__
            return (f"could not reach the Hub at {hub}: {reason}; check the network connection (and HF_ENDPOINT) "
                    "and push again")
    status = _status(exc)
    settings = f"{hub}/settings/tokens"
    if doing == "checking the token" and status == 401:
        return (f"the token was rejected by the Hub at {hub} (HTTP 401); run `hf auth login` or set HF_TOKEN to a "
                f"valid token ({settings})")
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return (f"the revision {target.revision!r} does not exist in {target.repo_id}; create the "
                "branch on the Hub first, or push without a revision")
    if status in (401, 403) or any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return (f"the token cannot write to {target.repo_id} (HTTP {status} while {doing}); use a token with "
                f"write access to that namespace ({settings})")
    detail = _one_line(str(exc))[:300] or type(exc).__name__
    code = f"HTTP {status}" if status else type(exc).__name__
    return f"the Hub at {hub} failed while {doing} ({code}: {detail}); push again, or check {hub}/{target.repo_id}"


def _hub_call(target: _Target, doing: str, call: Callable[[], T]) -> T:
    """Run one huggingface_hub call; any failure becomes a one-line PushError without the token."""
    try:
        return call()
    except Exception as e:  # the boundary with huggingface_hub: everything it raises is reported the same way
        message = _explain(e, doing, target)
        if target.created_repo:
            message += (f"; the empty repository {target.repo_id} that this call created remains (delete it on the "
                        "Hub or push again)")
        # `from None`: the hub's exception (its request carries the Authorization header) is not shown with ours
        raise PushError(scrub(message, target.token)) from None


# --- the push -------------------------------------------------------------------------------------------------------


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, dry_run: bool = False, commit_message: str | None = None,
         token: str | None = None, base_model: str | None = None) -> PushResult:
    """Upload every file of an `apply` output folder to the model repository `repo_id` in one commit.

    Args:
        folder: a folder written by `vlmcompress apply`.
        repo_id: `NAME` (in the token owner's namespace) or `ORG/NAME`; created when missing.
        private: create the repository private (an existing repository keeps its visibility).
        revision: the branch to commit to (created from the default branch when missing); default `main`.
        create_pr: open a pull request with the commit instead of committing to the branch.
        dry_run: check the folder and return what would be sent, without any network request or token.
        commit_message: default "Upload {folder name} compressed with vlmcompress {version}".
        token: default `HF_TOKEN`, else the login saved by `hf auth login`.
        base_model: a Hub id to name as the card's `base_model` (with the `base_model_relation` the stages imply),
            for outputs compressed from a local copy of a Hub model; the uploaded card carries it, the folder's
            README.md stays as it is.

    Raises:
        PushError: a folder that is not a complete output, a symbolic link in it, an invalid `repo_id`, no token,
            or a failed Hub request (one line each, without the token).
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    files = check_folder(folder)
    message = commit_message or default_commit_message(folder)
    card = None
    if base_model is not None:
        check_repo_id(base_model)
        card = card_with_base_model(folder, base_model)
        files = [(path, len(card) if path == "README.md" else size) for path, size in files]
    if dry_run:
        return PushResult(repo_id, files, message, dry_run=True)
    resolved = resolve_token(token)
    if not resolved:
        raise PushError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access, "
                        f"from {hub_endpoint()}/settings/tokens), or pass --dry-run to only check the folder")
    target = _Target(hub_endpoint(), repo_id, resolved, revision)
    return _publish(folder, files, message, target, private=private, create_pr=create_pr, card=card)


def card_with_base_model(folder: Path, base_model: str) -> bytes:
    """The folder's model card with `base_model` set (and `base_model_relation` from the recipe's stages)."""
    import yaml
    from huggingface_hub import ModelCard

    from .model_card import base_model_relation

    card = ModelCard.load(folder / "README.md")
    card.data.base_model = base_model
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text()) if (folder / "recipe.yaml").is_file() else {}
    relation = base_model_relation([s.get("method") for s in (recipe or {}).get("stages", []) if isinstance(s, dict)])
    if relation:
        card.data.base_model_relation = relation
    return str(card).encode()


def _publish(folder: Path, files: list[tuple[str, int]], message: str, target: _Target, *, private: bool,
             create_pr: bool, card: bytes | None = None) -> PushResult:
    from huggingface_hub import CommitOperationAdd, HfApi

    # library_name/version: the Hub sees uploads by vlmcompress in its user-agent statistics
    api = HfApi(endpoint=target.endpoint, token=target.token, library_name="vlmcompress", library_version=_version())
    token, revision = target.token, target.revision
    # whoami first: a bad token is reported as such, not as "repository not found" from a later call
    user = _hub_call(target, "checking the token", lambda: api.whoami(token=token))
    if ((user.get("auth") or {}).get("accessToken") or {}).get("role") == "read":  # known to fail: say so first
        raise PushError(f"the token cannot write to {target.repo_id}: it is a read-only token; create one with "
                        f"write access at {target.endpoint}/settings/tokens, then `hf auth login` or set HF_TOKEN")
    if "/" not in target.repo_id and user.get("name"):
        target.repo_id = f"{user['name']}/{target.repo_id}"  # what the Hub will call it; later calls need it whole
    repo_id = target.repo_id
    existed = _hub_call(target, "looking up the repository",
                        lambda: api.repo_exists(repo_id, repo_type="model", token=token))
    if not existed:
        # `private or None`: without --private, an organization's default (maybe private) applies, as on the website
        _hub_call(target, "creating the repository", lambda: api.create_repo(
            repo_id, private=private or None, exist_ok=True, repo_type="model", token=token))
        # create_repo(exist_ok=True) is silent when the name is taken by a repository this token cannot see
        if not _hub_call(target, "creating the repository",
                         lambda: api.repo_exists(repo_id, repo_type="model", token=token)):
            raise PushError(f"the token cannot write to {repo_id} (the name is taken by a repository it cannot "
                            f"see); use a token with write access to that namespace, or another name")
        target.created_repo = True
    if revision and not create_pr:
        _hub_call(target, f"creating the branch {revision!r}", lambda: api.create_branch(
            repo_id, branch=revision, repo_type="model", exist_ok=True, token=token))
    # one create_commit with every file: the Hub applies it whole or not at all
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=card if path == "README.md" and card
                                     else str(folder / path)) for path, _ in files]
    info = _hub_call(target, "uploading the files", lambda: api.create_commit(
        repo_id, operations, commit_message=message, repo_type="model", revision=revision, create_pr=create_pr,
        token=token))
    return PushResult(repo_id, files, message, created_repo=target.created_repo, commit_url=info.commit_url,
                      pr_url=info.pr_url)


def format_result(result: PushResult) -> list[str]:
    """The lines the CLI prints for `result`."""
    if result.dry_run:
        total = sum(size for _, size in result.files)
        width = max((len(path) for path, _ in result.files), default=0)
        digits = max((len(f"{size:,}") for _, size in result.files), default=0)
        return [f"dry run: would push {len(result.files)} files ({total:,} bytes) to {result.repo_id}; nothing sent",
                *(f"  {path:<{width}}  {size:>{digits},}" for path, size in result.files),
                f"commit message: {result.commit_message}"]
    lines = [f"pushed {len(result.files)} files to {result.repo_id}: {result.commit_url}"]
    if result.pr_url:
        lines.append(f"pull request: {result.pr_url}")
    if result.created_repo:
        lines.append(f"created the repository {result.repo_id}")
    return lines

"""Compressed checkpoints on the Hub (what `vlmcompress push` publishes), fetched into huggingface_hub's cache.

Only data files come down: configs, safetensors and processor files. The checkpoint's own Python files are never
fetched, since vlmcompress loads it with its installed classes. Offline mode (`HF_HUB_OFFLINE=1`) and a local
cache work as huggingface_hub makes them work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .errors import ModelLoadError

# what `load` needs from a pushed folder: its config, weights and processor / tokenizer / chat-template files
DATA_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md"]


def looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(name).exists() or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def compressed_snapshot(repo_id: str, is_compressed: Callable[[dict], bool], config_only: bool = False,
                        revision: str | None = None) -> Path | None:
    """The local snapshot folder of Hub repo `repo_id` when its `config.json` is a vlmcompress checkpoint's, else
    None (not a repo id, or a stock model, which the caller loads with transformers from the config cached here).
    With `config_only`, only `config.json` is fetched (a check reads no weights). Raises ModelLoadError when the
    config cannot be fetched (transformers would fail the same way, after waiting as long again) or the config says
    vlmcompress but the rest cannot be fetched."""
    from huggingface_hub import hf_hub_download, snapshot_download

    if not looks_like_repo_id(repo_id):
        return None
    try:  # the boundary with huggingface_hub: whatever it raises becomes one line
        config_file = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except Exception as e:
        raise ModelLoadError(f"could not read the config of Hub id '{repo_id}' ({_why(e)}); check the name, "
                             "the connection and HF_TOKEN") from None
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"the config.json of Hub id '{repo_id}' is not valid JSON ({e})") from None
    if not is_compressed(config):  # checkpoint.is_compressed, passed in (checkpoint imports this module)
        return None
    if config_only:
        return config_file.parent
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DATA_FILES))
    except Exception as e:  # network / cache errors after the config came down
        raise ModelLoadError(f"could not fetch the files of Hub id '{repo_id}' ({_why(e)}); check the connection, "
                             "or set HF_HUB_OFFLINE=1 to use the local cache") from None


def _why(e: Exception) -> str:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return "the repository is gated: accept its terms on the Hub and set HF_TOKEN"
    if isinstance(e, RepositoryNotFoundError):
        return "no such repository, or it is private and no token with access was given"
    if isinstance(e, RevisionNotFoundError):
        return "no such revision"
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):  # before EntryNotFoundError: a subclass
        return "not in the local cache, and the Hub was not reachable or HF_HUB_OFFLINE is set"
    if isinstance(e, EntryNotFoundError):
        return "the repository has no config.json"
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__

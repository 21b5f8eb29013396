"""Hugging Face repo ids (`meta-llama/Llama-4-Scout-17B-16E-Instruct`) -> a local snapshot folder.

What `huggingface-cli download REPO` fetched lives in the hub cache as
`<cache>/models--org--name/snapshots/<commit>/`, with `refs/<branch>` naming the commit. A repo id
is looked up there first, offline (huggingface_hub's own cache lookup, `local_files_only`), for the
asked revision (a branch, a tag or a commit; default `main`). Only when it is not cached, the hub
is reachable and offline mode is off is the snapshot downloaded (config, tokenizer, safetensors
and chat template files; Meta's `original/` consolidated weights are skipped).

The caller (herd.config) reads the environment (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE,
HF_ENDPOINT) and passes what it found here.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlparse

# What a serving checkpoint needs; weights in other formats and Meta's original/ folder stay out.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]
IGNORE_PATTERNS = ["original/*", "original/**"]
REACHABLE_TIMEOUT_S = 3.0


@dataclass
class HubSettings:
    cache_dir: str                  # the hub cache: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub
    offline: bool = False           # HF_HUB_OFFLINE: never contact the hub
    endpoint: str = "https://huggingface.co"


def is_repo_id(name: str) -> bool:
    """`org/name` or `name` as the hub spells them (no path separators beyond the one slash)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cached_snapshot(repo_id: str, revision: str | None, cache_dir: str) -> str | None:
    """The cached snapshot folder of `repo_id` at `revision`, or None (never contacts the hub)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def hub_reachable(endpoint: str, timeout: float = REACHABLE_TIMEOUT_S) -> bool:
    """A TCP connection to the hub's host opens within `timeout` seconds."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_repo_id(repo_id: str, revision: str | None, hub: HubSettings, what: str = "model") -> str:
    """The local folder of a repo id: cached, else downloaded when allowed. FileNotFoundError with
    what to do otherwise."""
    rev = revision or "main"
    found = cached_snapshot(repo_id, revision, hub.cache_dir)
    if found is not None:
        return found
    where = (f"{what} {repo_id!r} is not a local path and revision {rev!r} of it is not in the Hugging "
             f"Face cache ({hub.cache_dir})")
    fetch = f"huggingface-cli download {repo_id}" + (f" --revision {revision}" if revision else "")
    if hub.offline:
        raise FileNotFoundError(f"{where}; HF_HUB_OFFLINE is set, so it is not downloaded: run `{fetch}` "
                                "where the hub is reachable, or give a local folder")
    if not hub_reachable(hub.endpoint):
        raise FileNotFoundError(f"{where}, and the hub ({hub.endpoint}) is unreachable: run `{fetch}` where "
                                "it is reachable (HF_HOME / HF_HUB_CACHE / --download-dir choose the cache), "
                                "or give a local folder")
    return download_snapshot(repo_id, revision, hub, where)


def download_snapshot(repo_id: str, revision: str | None, hub: HubSettings, where: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, \
        RevisionNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=hub.cache_dir, endpoint=hub.endpoint,
                                 allow_patterns=DOWNLOAD_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    except GatedRepoError:
        raise FileNotFoundError(f"{where}; it is gated on the hub: accept its license there and log in "
                                "(`huggingface-cli login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{where}, and the hub has no such revision") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{where}, and the hub has no such repository (or it is private: log in "
                                "with `huggingface-cli login` or HF_TOKEN)") from None
    except (HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(f"{where}; downloading it failed: {type(e).__name__}: {e}") from None

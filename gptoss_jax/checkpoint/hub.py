"""Hugging Face Hub: a local folder as is, otherwise a repo id downloaded (safetensors and configs only)."""

from __future__ import annotations

import os
import re

from .layout import HF_INDEX

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_PATTERNS = ["model-*.safetensors", "model.safetensors", HF_INDEX, "config.json", "generation_config.json"]


def resolve(path_or_repo_id: str) -> str:
    """A local folder as is (its `original/` subfolder when the top has no weights is not guessed);
    otherwise a Hub repo id, downloading only what loading needs (not original/ or metal/)."""
    p = os.path.expanduser(os.fspath(path_or_repo_id))
    if os.path.exists(p):
        return p
    if p.count("/") != 1 or p.startswith((".", "/")) or not _REPO_ID.match(p) or os.path.isdir(p.split("/")[0]):
        # a relative path whose first folder exists here is a path, not a Hub id
        raise FileNotFoundError(f"{path_or_repo_id}: no such folder, and not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(p, allow_patterns=HUB_PATTERNS)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as e:
        raise RuntimeError(
            f"{p}: no such local folder, and could not download {p!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). If this machine is offline, download the checkpoint elsewhere and pass its local folder.") from e


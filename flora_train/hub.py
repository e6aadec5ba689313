"""Whether this machine reaches the Hugging Face hub, and what its cache holds.

Offline, huggingface_hub retries the hub for most of a minute, a warning a try, before an id it
cannot find fails; a run on an air-gapped cluster should hear at once what to do instead.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse


def unreachable_hub() -> str | None:
    """The hub's host when this machine cannot resolve it, else None (None too under
    ``HF_HUB_OFFLINE``, where huggingface_hub reads its cache alone and at once)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return host
    return None


def in_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the Hugging Face cache holds a download of ``repo_id``."""
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots").is_dir()

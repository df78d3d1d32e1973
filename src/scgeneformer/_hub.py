"""Opt-in loading from the Hugging Face hub: a repository id becomes a local folder or file.

Only a source that is not a local path and reads as ``owner/name`` goes to the hub, through
``huggingface_hub`` (the ``hub`` extra), which keeps its usual cache (``cache_dir``,
``HF_HOME``) and offline switches (``local_files_only=True``, ``HF_HUB_OFFLINE=1``). Nothing
downloads unless a repository id is given.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class HubOptions:
    """Where and how to look a repository up (``huggingface_hub``'s own arguments)."""

    revision: str | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    token: str | bool | None = None


def is_repo_id(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a hub repository rather than a local path.

    Examples
    --------
    >>> is_repo_id("ctheodoris/Geneformer"), is_repo_id("./runs/v1"), is_repo_id("model")
    (True, False, False)
    """
    text = str(source)
    return not Path(text).exists() and bool(_REPO_ID.match(text))


def _hub():
    try:
        import huggingface_hub
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "Loading from the Hugging Face hub needs huggingface_hub: "
            "pip install 'scgeneformer[hub]'. Or download the folder yourself and pass its path."
        ) from err
    return huggingface_hub


def hub_folder(repo_id: str, subfolder: str | None, options: HubOptions) -> Path:
    """Return the local folder of ``repo_id`` (its ``subfolder``), fetched into the cache.

    Only that subfolder's files are fetched (an official repository holds several models).
    """
    hub = _hub()
    patterns = None if subfolder is None else [f"{subfolder.strip('/')}/*"]
    try:
        snapshot = hub.snapshot_download(
            repo_id,
            revision=options.revision,
            cache_dir=options.cache_dir,
            local_files_only=options.local_files_only,
            token=options.token,
            allow_patterns=patterns,
        )
    except Exception as err:  # huggingface_hub's errors differ by version; all say why
        raise OSError(
            f"Could not get {repo_id!r}"
            + (f" (subfolder {subfolder!r})" if subfolder else "")
            + f" from the Hugging Face hub or its cache: {err}"
        ) from err
    folder = Path(snapshot) / (subfolder or "")
    if not folder.is_dir():
        raise FileNotFoundError(f"The repository {repo_id!r} has no folder {subfolder!r}.")
    return folder


def hub_file(repo_id: str, filename: str, subfolder: str | None, options: HubOptions) -> Path:
    """Return the local path of one file of ``repo_id``, fetched into the cache."""
    hub = _hub()
    try:
        return Path(
            hub.hf_hub_download(
                repo_id,
                filename,
                subfolder=subfolder,
                revision=options.revision,
                cache_dir=options.cache_dir,
                local_files_only=options.local_files_only,
                token=options.token,
            )
        )
    except Exception as err:  # as above
        raise OSError(
            f"Could not get {filename!r} of {repo_id!r} from the Hugging Face hub or its "
            f"cache: {err}"
        ) from err

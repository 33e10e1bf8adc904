"""The only importer of huggingface_hub: file listings, metadata, auth and URLs come from it
(``remote``); the transfer is ours (``transfer``); what goes wrong becomes our errors, in plain
words (``failures``).

Every file-system error on the way (a read-only or immutable cache, a file where a folder should
be, a full disk) becomes a DownloadError naming the path and the fix.
"""

from __future__ import annotations

from .failures import (
    CACHE_SETTING,
    HubUnreachable,
    NetworkError,
    ServerError,
    cache_writes,
    endpoint,
    filesystem_error,
    host,
    hub_name,
    network_hint,
    translate,
)
from .remote import Listing, Progress, RemoteFile, file_info, list_files
from .transfer import check_space, download

__all__ = [
    "CACHE_SETTING",
    "HubUnreachable",
    "Listing",
    "NetworkError",
    "Progress",
    "RemoteFile",
    "ServerError",
    "cache_writes",
    "check_space",
    "download",
    "endpoint",
    "file_info",
    "filesystem_error",
    "host",
    "hub_name",
    "list_files",
    "network_hint",
    "translate",
]

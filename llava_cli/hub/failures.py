"""What goes wrong between llava and the hub, as our errors: each names what failed and what to
do, in plain words (never an exception's class name).

A connection that cannot be made at all (no such host, refused, no route) is ``HubUnreachable``:
the model cannot be fetched now, exit 3, one retry at most. A connection lost or a slow answer is
``NetworkError`` and a 5xx is ``ServerError``: both worth more tries, each resuming. File-system
errors under the cache become a DownloadError naming the path and the setting that moves it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from ..config import environment
from ..errors import EXIT_MODEL_UNAVAILABLE, DownloadError, LlavaError, ModelNotAvailable

# A full disk, a quota, or a file-size limit (RLIMIT_FSIZE): all "free space, then resume".
DISK_FULL = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG))
CACHE_SETTING = "HF_HOME (or HF_HUB_CACHE)"
_HUB_HOST = "huggingface.co"
_NO_ROUTE = {
    errno.ENETUNREACH: "the network is unreachable",
    errno.EHOSTUNREACH: "there is no route to it",
    errno.ENETDOWN: "the network is down",
    errno.EHOSTDOWN: "the host is down",
    errno.ECONNREFUSED: "the connection was refused",
}


class ServerError(DownloadError):
    """A 5xx or 429 from the hub: worth another try."""


class NetworkError(DownloadError):
    """No answer, or a connection lost: worth another try (resuming)."""


class HubUnreachable(NetworkError):
    """No connection to the hub could be made at all (no such host, refused, no route, no
    network): the model cannot be fetched now, so it is "not available" (exit 3). Asking again
    at once rarely helps: one retry at most."""

    exit_code = EXIT_MODEL_UNAVAILABLE


def endpoint() -> str:
    environment().check_hub_timeouts()
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def timeout(kind: str) -> float:
    environment().check_hub_timeouts()
    from huggingface_hub import constants

    return float(
        constants.HF_HUB_ETAG_TIMEOUT if kind == "metadata" else constants.HF_HUB_DOWNLOAD_TIMEOUT
    )


def host() -> str:
    """The hub's host (and port), as a person would name it."""
    url = endpoint()
    return urlsplit(url).netloc or url


def hub_name() -> str:
    """``the Hugging Face hub (huggingface.co)``, or the mirror that HF_ENDPOINT names."""
    name = host()
    return f"the Hugging Face hub ({name})" if name == _HUB_HOST else f"the hub at {name}"


def network_hint() -> str:
    if host() == _HUB_HOST:
        return "check the network connection"
    return "check the network connection and HF_ENDPOINT"


@contextlib.contextmanager
def translate(
    repo: str, revision: str = "main", file: str | None = None, *, kind: str = "download"
) -> Iterator[None]:
    """huggingface_hub and HTTP errors → our errors, each with what to do. Never shows a token.

    ``kind`` ("metadata" or "download") names the timeout the request ran under."""
    import httpx2

    settings = environment()
    settings.check_hub_timeouts()
    from huggingface_hub import errors

    what = f"{file} in {repo}" if file else repo
    token_hint = (
        "HF_TOKEN is set, but that token has no access to it"
        if settings.hf_token_set
        else "if it is private or gated, set HF_TOKEN to a token with access"
    )
    try:
        yield
    except errors.OfflineModeIsEnabled as exc:
        raise ModelNotAvailable(
            f"cannot fetch {what}: offline mode", "unset HF_HUB_OFFLINE"
        ) from exc
    except errors.GatedRepoError as exc:
        raise ModelNotAvailable(
            f"{repo} is gated",
            f"accept its terms at {endpoint()}/{repo}; then {token_hint}",
        ) from exc
    except errors.RepositoryNotFoundError as exc:
        raise ModelNotAvailable(
            f"repo {repo} not found on {endpoint()}", f"check the name; {token_hint}"
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise ModelNotAvailable(
            f"revision {revision!r} not found in {repo}", "check the branch or commit id"
        ) from exc
    except errors.RemoteEntryNotFoundError as exc:
        raise ModelNotAvailable(
            f"{file or 'file'} not found in {repo} at {revision}",
            "the registry entry may be out of date; see `llava show`",
        ) from exc
    except errors.HfHubHTTPError as exc:
        raise _http_error(
            exc.response.status_code if exc.response is not None else 0, what
        ) from exc
    except json.JSONDecodeError as exc:  # a reply that is not the JSON it should be
        raise DownloadError(
            f"{host()} answered with something other than the hub's JSON for {what}",
            "check HF_ENDPOINT points at a Hugging Face hub, or try again later",
        ) from exc
    except httpx2.ConnectTimeout as exc:
        raise unreachable(f"no answer within {timeout(kind):g} s") from exc
    except httpx2.TimeoutException as exc:
        raise NetworkError(
            f"no answer from {host()} for {what} within {timeout(kind):g} s",
            f"{network_hint()} (or raise HF_HUB_DOWNLOAD_TIMEOUT)",
        ) from exc
    except (httpx2.TransportError, OSError) as exc:
        # an OSError: huggingface_hub reading HF_HOME (its token file), or a socket
        if isinstance(exc, OSError) and exc.filename is not None:
            raise filesystem_error(exc, Path(os.fsdecode(exc.filename)), action="use") from exc
        reason = connect_failure(exc)
        if reason is not None:
            raise unreachable(reason) from exc
        raise NetworkError(
            f"the connection to {host()} broke off while fetching {what}", network_hint()
        ) from exc


def unreachable(reason: str) -> HubUnreachable:
    return HubUnreachable(f"cannot reach {hub_name()}: {reason}", network_hint())


def connect_failure(exc: BaseException) -> str | None:
    """Why no connection could be made, in plain words; None when one was made (and lost)."""
    import httpx2

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        reason = _connect_reason(cause)
        if reason is not None:
            return reason
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx2.ConnectError):
        return "the connection could not be made"
    return None


def _connect_reason(exc: BaseException) -> str | None:
    if isinstance(exc, socket.gaierror):
        return "its host name could not be resolved"
    if isinstance(exc, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate could not be verified ({exc.verify_message or 'no reason given'})"
    if isinstance(exc, ssl.SSLError):
        return "the secure connection could not be set up"
    if isinstance(exc, OSError) and exc.errno in _NO_ROUTE:
        return _NO_ROUTE[exc.errno]
    return None


def _http_error(status: int, what: str) -> LlavaError:
    if status == 404:
        return ModelNotAvailable(
            f"{what} was not found on the hub (404)",
            "check the name and revision; a registry entry may be out of date",
        )
    if status in (401, 403):
        return ModelNotAvailable(
            f"the hub refused access to {what} ({status})", "set HF_TOKEN to a token with access"
        )
    kind = ServerError if status >= 500 or status == 429 else DownloadError
    return kind(f"the hub answered {status} for {what}", "try again later")


def filesystem_error(
    exc: OSError, where: Path, *, setting: str = CACHE_SETTING, action: str = "write to"
) -> DownloadError:
    """A failed read or write under a folder llava keeps, as one line: the path and the fix.

    ``where`` is the path the operation was about, for errors that do not name one; ``setting``
    the variable that moves that folder elsewhere.
    """
    path = Path(os.fsdecode(exc.filename)) if isinstance(exc.filename, str | bytes) else where
    code = exc.errno
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(path)
        if blocker is not None:
            return DownloadError(
                f"{blocker} is a file where a folder should be",
                f"move it away, or point {setting} at a folder",
            )
    if code in DISK_FULL:
        return DownloadError(
            f"disk full at {path}", "free some space and run `llava pull` again to resume"
        )
    hint = f"point {setting} at a writable folder"
    if code == errno.EROFS:
        reason = "read-only file system"
    elif code == errno.EPERM:
        reason = "operation not permitted"
        hint = f"make it writable (`chattr -i` if `lsattr` shows it immutable), or {hint}"
    elif code == errno.EACCES:
        reason = "permission denied"
        hint = f"give this user access to it, or {hint}"
    else:
        reason = (exc.strerror or (os.strerror(code) if code else "it failed")).lower()
    return DownloadError(f"cannot {action} {path}: {reason}", hint)


def _file_in_the_way(path: Path) -> Path | None:
    """The first part of ``path`` that exists and is not a folder (a file in the way)."""
    for part in (*reversed(path.parents), path):
        if os.path.lexists(part) and not part.is_dir():
            return part
    return None


@contextlib.contextmanager
def cache_writes(where: Path, *, setting: str = CACHE_SETTING) -> Iterator[None]:
    """File-system errors in the block → DownloadError with the path and the fix."""
    try:
        yield
    except OSError as exc:
        raise filesystem_error(exc, where, setting=setting) from exc

"""``llava pull REF...``: download models and their projectors, resumably and verified; and the
pull that ``ask``/``chat`` make of a model that is not on disk, which first says what it fetches.

A failed transfer is explained here, where the model is known: whether a partial download was
kept (and how much of it), and, when the hub cannot be reached at all, which pulled models work
without it (``--offline``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from .. import render, store
from ..config import environment
from ..errors import EXIT_OK, LlavaError, ModelNotAvailable
from ..hub import HubUnreachable, NetworkError, ServerError
from ..modelref import (
    ModelFiles,
    PullPlan,
    fetch,
    kept_partials,
    plan_pull,
    pull,
    resolve_local,
)
from ..registry import Ref, parse_ref
from ..text import display_path
from ..units import human_bytes

ASK_ABOVE = 1_000_000_000  # bytes: a bigger download that nobody asked for is asked about
_SHOWN_MODELS = 3  # pulled models named in an error's hint


def run(refs: list[str], *, offline: bool = False) -> int:
    """Pull each model in turn; a failure is reported and the rest still go ahead."""
    failures: list[LlavaError] = []
    done: list[str] = []
    offline = environment().offline(offline)
    with render.transfer_progress() as progress:
        for text in refs:
            try:
                ref = parse_ref(text)
                with explained(ref):
                    result = pull(ref, progress, offline=offline)
            except LlavaError as exc:
                if len(refs) == 1:
                    raise
                failures.append(exc)
                progress.note("Error: " + exc.one_line())
                continue
            files = result.files
            size = files.model.stat().st_size + files.mmproj.stat().st_size
            state = "pulled" if result.fetched else "already pulled"
            done.append(
                f"{files.name}: {state} ({human_bytes(size)}) in {display_path(files.model.parent)}"
            )
    for line in done:  # after the progress bars, so the lines never mix with them
        render.info(line)
    return failures[0].exit_code if failures else EXIT_OK


def files_for_run(model: str | None, mmproj: str | None, *, offline: bool, yes: bool) -> ModelFiles:
    """The files ``ask``/``chat`` load. A model that is not on disk is pulled first: stderr
    says what is fetched, how big and where; on a terminal a download over 1 GB is asked about
    first, unless ``yes``. Progress on stderr. ``offline``: the flag and ``HF_HUB_OFFLINE``
    together (``config.Environment.offline``)."""
    found = resolve_local(model, mmproj, offline=offline)
    if isinstance(found, ModelFiles):
        return found
    with explained(found):
        planned = plan_pull(found, render.PlainTransfer())  # notes only: no bar before asking
        if planned.left:
            _announce(planned, yes=yes)
        with render.transfer_progress() as progress:
            return fetch(planned, progress).files


def _announce(planned: PullPlan, *, yes: bool) -> None:
    target = planned.target
    name = target.ref if target.name == target.repo else f"{target.name} ({target.ref})"
    render.info(f"pulling {name}: {fetch_summary(planned)} into {display_path(planned.cache.root)}")
    if yes or planned.left <= ASK_ABOVE or not (sys.stderr.isatty() and render.can_ask()):
        return
    if not render.confirm(f"Download {human_bytes(planned.left)} now?"):
        raise ModelNotAvailable(
            f"{target.ref} was not downloaded",
            f"pull it when it suits you with `llava pull {target.ref}`, "
            "or pass -y (or set LLAVA_YES=1) to download without this question",
        )


def fetch_summary(planned: PullPlan) -> str:
    """``model 4.1 GB + projector 624.4 MB = 4.7 GB``: what is left to download, by file."""
    parts, seen = [], set()
    for file in planned.files:
        if file.remote.digest in seen:
            continue
        seen.add(file.remote.digest)
        if not file.left:
            parts.append(f"({file.role} already here)")
        elif file.have:
            whole = human_bytes(file.remote.size)
            parts.append(f"{file.role} {human_bytes(file.left)} (the rest of {whole})")
        else:
            parts.append(f"{file.role} {human_bytes(file.left)}")
    fetched = [p for p in parts if not p.startswith("(")]
    text = " + ".join(fetched)
    if len(fetched) > 1:
        text += f" = {human_bytes(planned.left)}"
    return " ".join([text, *(p for p in parts if p.startswith("("))])


@contextlib.contextmanager
def explained(ref: Ref) -> Iterator[None]:
    """A failed transfer's hint, completed with what is on disk: a partial download that the
    next pull resumes (only when there is one), and, when the hub cannot be reached, the
    pulled models that work without it."""
    try:
        yield
    except (NetworkError, ServerError) as exc:
        exc.hint = "; ".join(p for p in (exc.hint, *_on_disk(ref, exc)) if p)
        raise
    except KeyboardInterrupt:  # Ctrl-C during a download: say what the next run picks up
        kept = _kept_note(ref)
        if kept:
            render.info(f"stopped; {kept}")
        raise


def _kept_note(ref: Ref) -> str | None:
    """``1.2 GB of model.gguf (4.1 GB) is kept: `llava pull REF` resumes from there``."""
    kept = kept_partials(ref)
    if not kept:
        return None
    part = kept[0]
    what = f"{human_bytes(part.have)} of {part.file or 'a file'}"
    if part.size:
        what += f" ({human_bytes(part.size)})"
    more = f" and {len(kept) - 1} more partial files" if len(kept) > 1 else ""
    return f"{what}{more} is kept: `llava pull {ref}` resumes from there"


def _on_disk(ref: Ref, exc: LlavaError) -> list[str]:
    notes = []
    kept = _kept_note(ref)
    if kept:
        notes.append(kept)
    elif isinstance(exc, HubUnreachable):
        notes.append("nothing was downloaded")
    if isinstance(exc, HubUnreachable):
        notes.append(offline_choices())
    return notes


def offline_choices() -> str:
    """Which pulled models work without the network, for a hint."""
    pulled = sorted(r.ref for r in store.records() if r.present())
    if not pulled:
        return "no model is on disk yet to use with --offline"
    names = ", ".join(pulled[:_SHOWN_MODELS])
    if len(pulled) > _SHOWN_MODELS:
        names += f" and {len(pulled) - _SHOWN_MODELS} more (`llava list`)"
    return f"on disk, usable with --offline: {names}"

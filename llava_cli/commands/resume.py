"""Going on with a saved chat: ``llava chat -c`` (the last chat, kept after every turn),
``llava chat --resume FILE`` and ``/load FILE`` (one saved with ``/save``).

The file is read, every setting checked and every image read again (and checked against the
sha256 it was saved with) before anything changes, and on the command line before any model
is resolved, pulled or loaded. The chat goes on with the model it was saved with, unless one
is named (``-m``, or ``LLAVA_MODEL``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import transcript
from ..errors import BadInput
from ..modelref import looks_like_path
from ..slash import with_setting

if TYPE_CHECKING:
    from ..conversation import Exchange
    from ..images import PreparedImage
    from ..options import SamplingParams


@dataclass(frozen=True)
class Resumed:
    """A saved chat read and checked: its turns with their images, and its settings."""

    source: str  # the file as named, or "the last chat"
    saved: transcript.Transcript
    exchanges: list[Exchange]
    sampling: SamplingParams


def read(
    path: Path,
    source: str,
    sampling: SamplingParams,
    load_image: Callable[[str], PreparedImage],
    given: frozenset[str] = frozenset(),
) -> Resumed:
    """The chat saved in ``path``, its settings applied over ``sampling``, except those
    ``given`` now (on the command line or in the environment), which win."""
    saved = transcript.load(path)
    for key, value in saved.settings.items():
        if key not in given:
            sampling = with_setting(sampling, key, str(value))
    exchanges = transcript.restored_exchanges(saved, load_image)
    return Resumed(source, saved, exchanges, sampling)


def from_command_line(
    *,
    continue_last: bool,
    resume: str | None,
    sampling: SamplingParams,
    load_image: Callable[[str], PreparedImage],
    given: frozenset[str] = frozenset(),
) -> Resumed | None:
    """The chat that ``-c`` or ``--resume FILE`` names (None for neither). With no last chat,
    ``-c`` is an error (exit 4), as a missing file is: nothing starts that was not asked for."""
    if continue_last:
        path = transcript.last_chat_path()
        if not path.exists():
            raise BadInput("there is no earlier chat to continue", "start one: llava chat IMAGE")
        try:
            return read(path, "the last chat", sampling, load_image, given)
        except BadInput as exc:  # say whose file or image it is, and the way out
            raise BadInput(
                f"the last chat cannot be continued: {exc.message}",
                "start a new one with llava chat IMAGE (it replaces the last chat)",
            ) from None
    if resume is not None:
        return read(Path(resume).expanduser(), resume, sampling, load_image, given)
    return None


def model_for(
    saved: transcript.Transcript, model: str | None, mmproj: str | None
) -> tuple[str | None, str | None]:
    """The model a resumed chat goes on with: the one named now (``model``), else the one it
    was saved with: its files when it was given as files, else its name (a file's name alone,
    from an older record, finds nothing: then the default)."""
    if model is not None:
        return model, mmproj
    if saved.model_file:
        return saved.model_file, mmproj or saved.mmproj_file
    if saved.model and not looks_like_path(saved.model):
        return saved.model, mmproj
    return None, mmproj

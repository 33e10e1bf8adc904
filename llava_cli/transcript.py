"""Saved chats: a Markdown transcript for people, JSON for programs, and both for ``/load``.

A ``.json`` file holds the record below. Any other name gets Markdown (each turn, with its
images' paths, sizes and sha256) and the same record at the end in an HTML comment, which
Markdown viewers hide and ``/load`` reads. Images are stored by absolute path and sha256;
loading checks each file still has the bytes it had.

The chat also keeps its last conversation this way, after every turn (``last_chat.json``
beside the input history, 0600 like every saved chat), for ``llava chat -c``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import paths
from .errors import BadInput
from .files import check_write_target, read_regular, write_atomic

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .conversation import Exchange
    from .images import PreparedImage

FORMAT = "llava-chat/1"
_SIDE_MAX = 1 << 31  # pixels: no image is larger
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_BYTES = 128 << 20  # a 20,000-turn chat with long answers is about 40 MB
_MARK = "<!-- llava-chat\n"


@dataclass
class SavedImage:
    path: str
    sha256: str
    width: int
    height: int


@dataclass
class SavedTurn:
    prompt: str
    images: list[SavedImage] = field(default_factory=list)
    answer: str | None = None


@dataclass
class Transcript:
    model: str
    system: str | None
    settings: dict[str, Any]
    turns: list[SavedTurn]
    saved_at: float = 0.0
    # A model given as local files: their absolute paths (its name alone would not find them)
    model_file: str | None = None
    mmproj_file: str | None = None

    def record(self) -> dict[str, Any]:
        files = {"model_file": self.model_file, "mmproj_file": self.mmproj_file}
        return {
            "format": FORMAT,
            "saved_at": self.saved_at or time.time(),
            "model": self.model,
            **{key: path for key, path in files.items() if path is not None},
            "system": self.system,
            "settings": self.settings,
            "turns": [
                {
                    "prompt": t.prompt,
                    "images": [vars(i) for i in t.images],
                    "answer": t.answer,
                }
                for t in self.turns
            ],
        }


def last_chat_path() -> Path:
    """Where the chat keeps its last conversation, for ``llava chat -c``."""
    return paths().data_dir / "last_chat.json"


def private_folder(path: Path) -> None:
    """Create ``path`` (and its parents) if missing, the folder itself readable only by its
    owner (0700), as the chats and the input history kept in it are (0600)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def save_last(transcript: Transcript) -> None:
    """Keep ``transcript`` as the last chat (replacing the one before, atomically)."""
    path = last_chat_path()
    try:
        private_folder(path.parent)
    except OSError as exc:
        raise BadInput(
            f"cannot create {path.parent}: {exc.strerror or exc}", "check LLAVA_HOME and its rights"
        ) from exc
    save(transcript, path)


def saved_turns(exchanges: Sequence[Exchange]) -> list[SavedTurn]:
    """A conversation's turns as they are saved: images by absolute path and sha256."""
    return [
        SavedTurn(
            ex.prompt,
            [SavedImage(_saved_path(i.source), i.sha256, i.width, i.height) for i in ex.images],
            ex.answer,
        )
        for ex in exchanges
    ]


def _saved_path(source: str) -> str:
    """An image's path as saved: absolute, or ``-`` for one read from standard input."""
    return source if source == "-" else str(Path(source).resolve())


def restored_exchanges(
    saved: Transcript, load_image: Callable[[str], PreparedImage]
) -> list[Exchange]:
    """The saved turns with their images read again, each checked to have the bytes it had
    when the chat was saved (a changed or missing image is an error: nothing is restored)."""
    from .conversation import Exchange

    def reload(image: SavedImage) -> PreparedImage:
        if image.path == "-":  # never read standard input for it: it holds something else now
            raise BadInput(
                "an image of this chat came from standard input, which cannot be read again",
                "attach images as files to chats you mean to go on with",
            )
        prepared = load_image(image.path)
        if prepared.sha256 != image.sha256:
            raise BadInput(
                f"{image.path} changed since the chat was saved (sha256 differs)",
                "restore the original file; nothing was loaded",
            )
        return prepared

    return [Exchange(t.prompt, [reload(i) for i in t.images], t.answer) for t in saved.turns]


def save(transcript: Transcript, path: Path) -> None:
    record = transcript.record()
    if path.suffix.lower() == ".json":
        text = json.dumps(record, ensure_ascii=False, indent=2) + "\n"
    else:
        text = _markdown(transcript, record)
    check_write_target(path, "chat file")
    if not path.parent.is_dir():
        raise BadInput(f"folder {path.parent} does not exist", "create it first, or save elsewhere")
    try:
        write_atomic(path, text.encode("utf-8", "replace"))
    except OSError as exc:
        raise BadInput(
            f"cannot write {path}: {exc.strerror or exc}", "choose another file"
        ) from exc


def _markdown(t: Transcript, record: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record["saved_at"]))
    out = [f"# Chat with {t.model}", "", f"Saved {when}."]
    if t.system:
        out += ["", "**System:** " + t.system]
    for turn in t.turns:
        out += ["", "## You", ""]
        for image in turn.images:
            out.append(
                f"![image]({Path(image.path).as_uri()}) `{image.path}` "
                f"({image.width}×{image.height}, sha256 `{image.sha256}`)  "
            )
        out += [turn.prompt, "", "## llava", "", turn.answer or "*(no answer)*"]
    payload = json.dumps(record, ensure_ascii=False, indent=1).replace("--", "\\u002d\\u002d")
    out += ["", _MARK + payload + "\n-->", ""]
    return "\n".join(out)


class _NotAChat(ValueError):
    """What is wrong with a file that parses as JSON but is not a saved chat, in words."""


def _image(item: Any) -> SavedImage:
    image = SavedImage(**item)
    if not (isinstance(image.path, str) and isinstance(image.sha256, str)):
        raise _NotAChat("an image without a path or sha256")
    for side in (image.width, image.height):
        if not isinstance(side, int) or isinstance(side, bool) or not 0 < side <= _SIDE_MAX:
            raise _NotAChat("an image without its size")
    return image


def _text(value: Any, what: str) -> str:
    """Text as /save writes it: a string, with no lone surrogate (which no encoder takes)."""
    if not isinstance(value, str):
        raise _NotAChat(f"{what} is not text")
    if _SURROGATE.search(value):
        raise _NotAChat(f"{what} holds a lone surrogate")
    return value


def load(path: Path) -> Transcript:
    try:
        text = read_regular(path, MAX_BYTES, "chat file").decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(
            f"{path} is not a chat saved by llava (not UTF-8 text)",
            "give a chat saved with /save (Markdown or JSON)",
        ) from exc
    try:
        start = text.rfind(_MARK)
        if start >= 0:
            end = text.find("-->", start)
            if end < 0:
                raise _NotAChat("its record has no end (-->)")
            text = text[start + len(_MARK) : end]
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise _NotAChat(f'no "format": "{FORMAT}"')
        turns = [
            SavedTurn(
                _text(t["prompt"], "a prompt"),
                [_image(i) for i in t.get("images", [])],
                None if t.get("answer") is None else _text(t["answer"], "an answer"),
            )
            for t in data["turns"]
        ]
        system = data.get("system")
        if system is not None:
            system = _text(system, "its system prompt")
        files = [data.get(key) for key in ("model_file", "mmproj_file")]
        model_file, mmproj_file = (_text(f, "a model file") if f else None for f in files)
        return Transcript(
            str(data.get("model", "")),
            system,
            dict(data.get("settings") or {}),
            turns,
            float(data.get("saved_at") or 0),
            model_file,
            mmproj_file,
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        # Python's own words ("'list' object has no attribute 'get'") would not help.
        why = str(exc) if isinstance(exc, _NotAChat) else "not the JSON /save writes"
        raise BadInput(
            f"{path} is not a chat saved by llava ({why})",
            "give a chat saved with /save (Markdown or JSON)",
        ) from exc

"""``llava chat``: a conversation about images that never re-reads what it has already seen.

Each turn re-renders the conversation and the engine's Session evaluates only what changed:
a follow-up costs its own tokens, an image is encoded once, ``/retry`` regenerates from the
end of the question without evaluating anything, ``/undo`` cuts the cache back at the next
turn. The input line is ``repl.LineReader``; this module holds the slash commands.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import render, transcript
from ..config import debug_enabled, paths
from ..errors import EXIT_OK, BadInput, ContextOverflow, LlavaError, UsageError
from ..images import PreparedImage, thumbnail
from ..modelref import ModelFiles
from ..options import MAX_TOKEN_CHARS, SamplingParams, parse_number
from .ask import (
    ModelOptions,
    check_chat_format,
    model_files,
    note_unanswered,
    warn_if_no_thinking,
)

if TYPE_CHECKING:
    from ..conversation import Conversation, Exchange
    from ..engine import Completion, Counters

ANSWER_ROOM = 256  # tokens kept free for the answer when the conversation must be shortened

COMMANDS = {
    "/image": "PATH... attach images to the next message",
    "/images": "the images and their token cost; '/images clear' detaches those not sent yet",
    "/clear": "start a new conversation (same model)",
    "/system": "TEXT set the system prompt; '/system' shows it, '/system -' resets it",
    "/retry": "answer the last message again",
    "/undo": "drop the last message and its answer",
    "/save": "FILE save the chat (.json for programs, else Markdown)",
    "/load": "FILE resume a saved chat",
    "/set": "KEY VALUE temperature, top-p, top-k, min-p, repeat-penalty, max-tokens, seed",
    "/stats": "context use, and the last turn's work and speed",
    "/prompt": "[TEXT] the prompt as the model reads it: so far, or with TEXT as the next message",
    "/help": "this list",
    "/exit": "end the chat (also Ctrl-D)",
}


@dataclass(frozen=True, kw_only=True)
class ChatOptions(ModelOptions):
    images: list[str] = field(default_factory=list)
    history: bool = True
    prompt: str | None = None  # the first message, sent as soon as the model is loaded
    resume: str | None = None  # a chat saved with /save, resumed
    continue_last: bool = False  # the last chat, resumed where it ended (-c)


def run(opts: ChatOptions) -> int:
    from ..repl import reader

    chat = open_chat(opts)
    try:
        for source in opts.images:
            try:
                chat.attach(source)
            except LlavaError as exc:  # a bad image on the command line: say so, chat anyway
                render.error(exc.one_line())
        history = paths().data_dir / "chat_history" if opts.history else None
        chat.run(reader(COMMANDS, history).lines())
    finally:
        chat.close()
    return EXIT_OK


def open_chat(opts: ChatOptions) -> Chat:
    """Resolve (pull if needed) and load the model; print the header line."""
    from ..conversation import Conversation, open_model
    from ..engine import backend_info

    check_chat_format(opts.runtime.chat_format)
    files = model_files(opts.model, opts.mmproj, offline=opts.offline)
    loaded = open_model(files.model, files.mmproj, opts.runtime, known_format=files.chat_format)
    warn_if_no_thinking(opts, loaded.fmt)
    backend = backend_info()["backend"]
    render.info(
        f"llava chat · {files.name} · context {loaded.session.n_ctx} tokens · {backend}"
        " — /help for commands, Ctrl-D to quit"
    )
    return Chat(Conversation(loaded, system=opts.system, think=opts.think), files, opts)


@dataclass
class Chat:
    conversation: Conversation
    files: ModelFiles
    opts: ChatOptions
    pending: list[PreparedImage] = field(default_factory=list)
    sampling: SamplingParams = field(init=False)
    default_system: str | None = field(init=False)
    last_work: Counters | None = None
    last_completion: Completion | None = None
    markdown: bool = field(default_factory=lambda: sys.stdout.isatty())  # noqa: PLW0108 (today's stdout)

    def __post_init__(self) -> None:
        self.sampling = self.opts.sampling
        self.default_system = self.conversation.system

    def close(self) -> None:
        self.conversation.loaded.close()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, lines: Iterable[str]) -> None:
        for line in lines:
            if not self.handle(line):
                break

    def handle(self, line: str) -> bool:
        """One line from the user; False ends the chat. Errors are reported, never fatal."""
        text = line.strip()
        if not text:
            return True
        try:
            if text.startswith("//"):  # a message that starts with a slash
                self.turn(line.lstrip()[1:])
            elif text.startswith("/"):
                return self.command(text)
            else:
                self.turn(line)
        except LlavaError as exc:
            render.error(exc.one_line())
        except KeyboardInterrupt:  # Ctrl-C outside an answer: the command stops, the chat goes on
            render.info("(cancelled)")
        except Exception as exc:  # a bug or an OS error: report it, keep the conversation
            if debug_enabled() or render.stdout_failed():  # nowhere to answer: end the chat
                raise
            render.error(f"unexpected {type(exc).__name__}: {exc} — set LLAVA_DEBUG=1 for more")
        return True

    def command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        handler = self._handlers().get(name)
        if handler is None:
            raise UsageError(f"unknown command {name}", "/help lists the commands")
        handler(arg)
        return True

    def _handlers(self) -> dict[str, Callable[[str], None]]:
        return {
            "/image": self.cmd_image,
            "/images": self.cmd_images,
            "/clear": self.cmd_clear,
            "/system": self.cmd_system,
            "/retry": self.cmd_retry,
            "/undo": self.cmd_undo,
            "/save": self.cmd_save,
            "/load": self.cmd_load,
            "/set": self.cmd_set,
            "/stats": self.cmd_stats,
            "/prompt": self.cmd_prompt,
            "/help": self.cmd_help,
        }

    # -- turns ------------------------------------------------------------------------------

    def turn(self, prompt: str) -> None:
        images = list(self.pending)
        kept = self.conversation.exchanges()
        sent = False
        try:
            self._make_room(prompt, images)
            sent = self._answer(
                lambda echo: self.conversation.ask(prompt, images, self.sampling, echo)
            )
        finally:
            if sent:  # the question made it in, with its images
                self.pending.clear()
            else:  # nothing was asked: whatever was dropped to make room comes back
                self.conversation.replace(kept)

    def _answer(self, start: Callable[[render.ThinkingEcho], Generator[str, None, None]]) -> bool:
        """Stream one answer (a reasoning model's thinking dimmed on stderr before it);
        True once the question is in the conversation."""
        session = self.conversation.loaded.session
        counters = session.counters.snapshot()
        before = len(self.conversation.messages)
        echo = render.ThinkingEcho()
        stream = start(echo)
        interrupted = False
        try:
            if self.markdown:
                render.stream_markdown(echo.answer(stream))
            else:
                render.stream_answer(echo.answer(stream))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            stream.close()  # Ctrl-C may land outside the generator: finish it, keep the answer
            self.last_work = _delta(session.counters, counters)
            self.last_completion = session.last
        sent = len(self.conversation.messages) > before
        if sent and not interrupted:
            note_unanswered(self.conversation)
        if interrupted:
            render.info(
                "(stopped; the answer so far stays in the conversation)"
                if sent
                else "(stopped before the answer began; the message was not sent)"
            )
        completion = session.last
        if completion is not None and completion.finish_reason == "length":
            full = session.n_cells >= session.n_ctx
            render.info(
                "(the answer was cut: the context is full — /clear, or a larger --ctx)"
                if full
                else "(the answer was cut at max-tokens — /set max-tokens N for longer ones)"
            )
        return sent

    def _make_room(self, prompt: str, images: list[PreparedImage]) -> None:
        """Shorten the conversation from the oldest turn if the next one would not fit."""
        conversation = self.conversation
        n_ctx = conversation.loaded.session.n_ctx
        alone = conversation.measure(prompt, images, history=False)
        if alone >= n_ctx:  # say so before dropping anything
            detach = " or /images clear to detach the waiting images," if images else ""
            raise ContextOverflow(
                f"this message needs {alone} tokens, and the context holds {n_ctx}",
                f"shorten it,{detach} or restart with a larger --ctx",
            )
        room = min(self.sampling.max_tokens or ANSWER_ROOM, n_ctx // 4)
        exchanges = conversation.exchanges()

        def too_long(kept: list[Exchange]) -> bool:
            """Longer than any context of ``n_ctx`` tokens can hold, whatever the tokens: no
            need to render and tokenize it whole to find out (a loaded chat of 200,000 turns,
            or one turn of 50 MB)."""
            chars = sum(len(ex.prompt) + len(ex.answer or "") for ex in kept)
            return chars > n_ctx * MAX_TOKEN_CHARS

        need = None if too_long(exchanges) else conversation.measure(prompt, images)
        if need is not None and need + room <= n_ctx:
            return
        # Keep the most recent exchanges that fit. Counted from the newest, doubling then
        # bisecting, each measurement renders only what it keeps, and what fits is bounded by
        # the context: a loaded chat of 200,000 turns costs as little as one of 200.
        if not exchanges:
            return

        def fits(keep: int) -> bool:
            kept = exchanges[len(exchanges) - keep :] if keep else []
            if too_long(kept):
                return False
            conversation.replace(kept)
            return conversation.measure(prompt, images) + room <= n_ctx

        fitting, step = 0, 1  # ``fitting`` exchanges are known to fit
        while step < len(exchanges) and fits(step):
            fitting, step = step, step * 2
        too_many = min(step, len(exchanges))  # keeping all of them does not fit (measured)
        while too_many - fitting > 1:
            middle = (fitting + too_many) // 2
            if fits(middle):
                fitting = middle
            else:
                too_many = middle
        low = len(exchanges) - fitting  # exchanges dropped
        conversation.replace(exchanges[low:])
        n_images = sum(len(ex.images) for ex in exchanges[:low])
        what = f" and {n_images} image(s)" if n_images else ""
        messages = "the oldest message" if low == 1 else f"the {low} oldest messages"
        needs = f"needs {need} of {n_ctx} tokens" if need else f"does not fit {n_ctx} tokens"
        render.info(f"context: this turn {needs} plus room to answer; dropping {messages}{what}")

    # -- commands ---------------------------------------------------------------------------

    def attach(self, source: str) -> None:
        image = self.opts.load_image(source)
        cost = self.conversation.loaded.session.image_cost(image)
        self.pending.append(image)
        render.info(f"attached {source}: {image.size_text('×')}, {cost} tokens")
        if render.stderr_is_terminal():
            render.image_preview(*thumbnail(image))

    def cmd_image(self, arg: str) -> None:
        sources = _split(arg)
        if not sources:
            raise UsageError("/image needs a path", "/image PATH...")
        for source in sources:
            try:
                self.attach(source)
            except LlavaError as exc:  # the rest still attach
                render.error(exc.one_line())

    def cmd_images(self, arg: str) -> None:
        if arg == "clear":
            render.info(f"detached {len(self.pending)} image(s) waiting for the next message")
            self.pending.clear()
            return
        session = self.conversation.loaded.session
        rows = [(image, "") for image in self.conversation.images]
        rows += [(image, " (next message)") for image in self.pending]
        if not rows:
            render.info("no images yet — /image PATH")
            return
        for i, (image, note) in enumerate(rows, 1):
            cost = session.image_cost(image)
            render.info(f"{i}. {image.source}: {image.size_text('×')}, {cost} tokens{note}")

    def cmd_clear(self, _arg: str) -> None:
        self.conversation.reset()
        self.pending.clear()
        render.info("new conversation")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            render.info(f"system prompt: {self.conversation.system or '(the format default)'}")
            return
        self.conversation.system = self.default_system if arg == "-" else arg
        render.info("system prompt set; it applies to the whole conversation")

    def cmd_retry(self, _arg: str) -> None:
        exchanges = self.conversation.exchanges()
        if not exchanges:
            raise UsageError("nothing to retry yet")
        last = self.conversation.drop(len(exchanges) - 1)
        sent = False
        try:
            sent = self._answer(
                lambda echo: self.conversation.ask(last.prompt, last.images, self.sampling, echo)
            )
        finally:
            if not sent:  # not even the question was evaluated again: keep the old answer
                self.conversation.replace(exchanges)

    def cmd_undo(self, _arg: str) -> None:
        exchanges = self.conversation.exchanges()
        if not exchanges:
            raise UsageError("nothing to undo")
        gone = self.conversation.drop(len(exchanges) - 1)
        render.info(f"dropped: {_preview(gone.prompt)}")

    def cmd_save(self, arg: str) -> None:
        names = _split(arg)
        if len(names) != 1:
            raise UsageError("/save needs one file name", "/save chat.md or /save chat.json")
        path = Path(names[0]).expanduser()
        turns = [
            transcript.SavedTurn(
                ex.prompt,
                [
                    transcript.SavedImage(
                        str(Path(i.source).resolve()), i.sha256, i.width, i.height
                    )
                    for i in ex.images
                ],
                ex.answer,
            )
            for ex in self.conversation.exchanges()
        ]
        record = transcript.Transcript(
            self.files.name, self.conversation.system, _settings(self.sampling), turns
        )
        transcript.save(record, path)
        render.info(f"saved {len(turns)} turns to {path}")

    def cmd_load(self, arg: str) -> None:
        from ..conversation import Exchange

        names = _split(arg)
        if len(names) != 1:
            raise UsageError("/load needs one file name", "/load chat.md")
        saved = transcript.load(Path(names[0]).expanduser())
        sampling = self.sampling
        for key, value in saved.settings.items():
            sampling = _set(sampling, key, str(value))
        exchanges = [
            Exchange(t.prompt, [_reload(i, self.opts) for i in t.images], t.answer)
            for t in saved.turns
        ]
        # Every setting and image checked out: only now does anything change.
        self.conversation.replace(exchanges)
        self.conversation.system = saved.system
        self.sampling = sampling
        self.pending.clear()
        if saved.model and saved.model != self.files.name:
            render.info(f"note: saved with {saved.model}, continuing with {self.files.name}")
        render.info(f"loaded {len(exchanges)} turns from {names[0]}")

    def cmd_set(self, arg: str) -> None:
        parts = arg.split()
        if not parts:
            for key, value in _settings(self.sampling).items():
                render.info(f"{key} {value}")
            return
        if len(parts) != 2:
            raise UsageError("/set takes a key and a value", "e.g. /set temperature 0.7")
        self.sampling = _set(self.sampling, parts[0], parts[1])
        render.info(f"{parts[0]} = {parts[1]}")

    def cmd_prompt(self, arg: str) -> None:
        """The text the model reads, exactly (on stdout: it is what was asked for)."""
        if arg:
            text = self.conversation.prompt_for(arg, self.pending)
        elif self.conversation.messages:
            text = self.conversation.prompt_so_far()
        else:
            render.info("nothing said yet: '/prompt TEXT' shows the prompt TEXT would make")
            return
        render.exact_text(text if text.endswith("\n") else text + "\n")

    def cmd_stats(self, _arg: str) -> None:
        session = self.conversation.loaded.session
        render.info(f"context: {session.n_cells} of {session.n_ctx} tokens in use")
        work, done = self.last_work, self.last_completion
        if work is None or done is None:
            render.info("no turn yet")
            return
        t = done.timings
        render.info(
            f"last turn: evaluated {work.text_tokens_evaluated} text and "
            f"{work.image_tokens_evaluated} image tokens, reused {done.usage.cached_tokens} "
            f"from the cache; images encoded: {work.image_chunks_encoded}"
        )
        render.info(
            f"answer: {done.usage.completion_tokens} tokens, first token after {t.ttft_s:.2f} s, "
            f"{t.decode_tokens_per_s:.1f} tokens/s ({done.finish_reason})"
        )

    def cmd_help(self, _arg: str) -> None:
        width = max(len(name) for name in COMMANDS)
        for name, text in COMMANDS.items():
            render.info(f"{name:<{width}}  {text}")
        render.info("Alt-Enter: new line · Ctrl-C: stop an answer, or clear the line · //: send /")


def _split(arg: str) -> list[str]:
    try:
        return shlex.split(arg)
    except ValueError as exc:
        raise UsageError(f"cannot read {arg!r}: {exc}", "quote paths with spaces") from exc


def _preview(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _reload(saved: transcript.SavedImage, opts: ChatOptions) -> PreparedImage:
    image = opts.load_image(saved.path)
    if image.sha256 != saved.sha256:
        raise BadInput(
            f"{saved.path} changed since the chat was saved (sha256 differs)",
            "restore the original file; nothing was loaded",
        )
    return image


# The settings /set changes: their names are the command-line options', their ranges
# options.LIMITS.
_SETTINGS = ("temperature", "top-p", "top-k", "min-p", "repeat-penalty", "max-tokens", "seed")


def _set(sampling: SamplingParams, key: str, value: str) -> SamplingParams:
    key = key.lower().replace("_", "-")
    if key not in _SETTINGS:
        raise UsageError(f"unknown setting {key!r}", "one of: " + ", ".join(_SETTINGS))
    field_name = key.replace("-", "_")
    if key in ("max-tokens", "seed") and value.lower() in ("none", "random", "default"):
        unset: dict[str, Any] = {field_name: None}
        return replace(sampling, **unset)
    changes: dict[str, Any] = {field_name: parse_number(key, value)}
    return replace(sampling, **changes)


def _settings(sampling: SamplingParams) -> dict[str, Any]:
    return {key: getattr(sampling, key.replace("-", "_")) for key in _SETTINGS}


def _delta(now: Counters, before: Counters) -> Counters:
    from dataclasses import fields

    return type(now)(
        **{f.name: getattr(now, f.name) - getattr(before, f.name) for f in fields(now)}
    )

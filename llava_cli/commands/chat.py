"""``llava chat``: a conversation about images that never re-reads what it has already seen.

Each turn re-renders the conversation and the engine's Session evaluates only what changed:
a follow-up costs its own tokens, an image is encoded once, ``/retry`` regenerates from the
end of the question without evaluating anything, ``/undo`` cuts the cache back at the next
turn. The input line is ``repl.LineReader``; the slash-command table is ``slash.COMMANDS``;
this module runs them.

Everything the command line names (images, a chat to resume) is read and checked before any
model is resolved, pulled or loaded: a typo costs nothing. After every turn the conversation
is kept as the last chat (``transcript.last_chat_path``) for ``llava chat -c``.

Longer than our ~400 lines on purpose: the turn loop and the slash commands it runs share
the conversation's state; the pieces that stand alone already live elsewhere (repl.py, slash.py,
commands/resume.py, transcript.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import render, transcript
from ..config import debug_enabled, environment, paths
from ..errors import EXIT_OK, LlavaError, UsageError
from ..images import PreparedImage, thumbnail
from ..modelref import ModelFiles, looks_like_path
from ..options import SamplingParams
from ..slash import COMMANDS, canonical, help_lines, settings_of, split_words, with_setting
from ..units import plural, rate
from . import resume
from .ask import (
    ModelOptions,
    check_chat_format,
    model_files,
    note_unanswered,
    warn_if_no_thinking,
)

if TYPE_CHECKING:
    from ..conversation import Conversation
    from ..engine import Completion, Counters

__all__ = ["COMMANDS", "Chat", "ChatOptions", "open_chat", "run"]


@dataclass(frozen=True, kw_only=True)
class ChatOptions(ModelOptions):
    images: list[str] = field(default_factory=list)
    prompt: str | None = None  # the first message, answered as soon as the model is loaded
    resume: str | None = None  # a chat saved with /save, to go on with (--resume FILE)
    continue_last: bool = False  # go on with the last chat (-c, --continue)
    history: bool = True  # keep the input history, and the last chat for -c
    given: frozenset[str] = frozenset()  # settings set now (flags, env): a resumed chat's yield


def run(opts: ChatOptions) -> int:
    from ..repl import reader

    if opts.resume is not None and opts.continue_last:
        raise UsageError(
            "--continue and --resume cannot go together",
            "-c goes on with the last chat, --resume FILE with a saved one",
        )
    check_chat_format(opts.runtime.chat_format)
    images = [opts.load_image(source) for source in opts.images]  # a bad one: exit 4, now
    resumed = resume.from_command_line(
        continue_last=opts.continue_last,
        resume=opts.resume,
        sampling=opts.sampling,
        load_image=opts.load_image,
        given=opts.given,
    )
    if resumed is not None:
        model, mmproj = resume.model_for(resumed.saved, opts.model, opts.mmproj)
        opts = replace(opts, model=model, mmproj=mmproj)
    chat = open_chat(opts)
    try:
        if resumed is not None:
            chat.restore(resumed)
            if opts.system is not None:  # --system, given now, over the saved one
                chat.conversation.system = opts.system
        for image in images:
            chat.attach_image(image)
        if opts.prompt is not None:  # bytes that are not UTF-8 (argv's surrogates): U+FFFD
            chat.send(opts.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
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
    offline = environment().offline(opts.offline)  # --offline, or HF_HUB_OFFLINE
    files = model_files(opts.model, opts.mmproj, offline=offline, yes=opts.yes)
    quiet = not opts.runtime.verbose  # llama.cpp's log lines would land on the status line
    if quiet:
        render.status(f"loading {files.name}")
    loaded = open_model(files.model, files.mmproj, opts.runtime, known_format=files.chat_format)
    if quiet:
        loaded.session.on_progress = render.status  # encoding an image, reading the prompt
    warn_if_no_thinking(opts, loaded.fmt)
    backend = backend_info()["backend"]
    if servers := loaded.engine.opts.rpc:  # the layers are over there
        backend += f" + RPC {', '.join(servers)}"
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
    keep_last: bool = field(init=False)  # the conversation is kept for -c after each change
    _keep_failed: bool = False  # keeping it failed once (said once, not at every turn)

    def __post_init__(self) -> None:
        self.sampling = self.opts.sampling
        self.default_system = self.conversation.system
        self.keep_last = self.opts.history

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
        if text.startswith("/") and not text.startswith("//"):
            return self._reported(lambda: self.command(text))
        if text:
            self.send(line.lstrip()[1:] if text.startswith("//") else line)  # //: a message
        return True

    def send(self, message: str) -> None:
        """One message (the first may come from the command line); errors are reported."""
        self._reported(lambda: self.turn(message))
        self.keep()

    def _reported(self, action: Callable[[], Any]) -> bool:
        """``action``'s result (True when it returns nothing); an error is reported, and the
        chat goes on."""
        try:
            return action() is not False
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
        name, arg = canonical(name), arg.strip()
        if name == "/exit":
            return False
        handler = self._handlers().get(name)
        if handler is None:
            raise UsageError(f"unknown command {name}", "/help lists the commands")
        try:
            handler(arg)
        finally:
            if name in _CHANGES_THE_CHAT:
                self.keep()
        return True

    def keep(self) -> None:
        """Keep the conversation as the last chat (``llava chat -c``), once it has a turn:
        a chat opened and left at once leaves the one before in place. A failure is said
        once; the chat goes on."""
        if not self.keep_last or not self.conversation.messages:
            return
        try:
            transcript.save_last(self.as_saved())
        except LlavaError as exc:
            if not self._keep_failed:
                render.error(f"cannot keep this chat for -c: {exc.one_line()}")
            self._keep_failed = True

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
        from ..repl import keys_unechoed

        session = self.conversation.loaded.session
        counters = session.counters.snapshot()
        before = len(self.conversation.messages)
        echo = render.ThinkingEcho()
        stream = start(echo)
        interrupted = False
        try:
            with keys_unechoed():  # no ^C drawn into the live view (it would be redrawn askew)
                if self.markdown:
                    render.stream_markdown(echo.answer(stream))
                else:
                    render.stream_answer(echo.answer(stream))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            stream.close()  # Ctrl-C may land outside the generator: finish it, keep the answer
            render.status_clear()  # a status of the evaluation, if it ended before the answer
            self.last_work = session.counters - counters
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
        """Shorten the conversation if the next turn would not fit (``room.make_room``: a
        large part of the oldest text at once, images last), and say what was dropped."""
        from .room import answer_room, make_room

        n_ctx = self.conversation.loaded.session.n_ctx
        room = answer_room(self.sampling.max_tokens, n_ctx)
        dropped = make_room(self.conversation, prompt, images, answer_room=room)
        if dropped is not None:
            render.info(dropped.notice())

    # -- commands ---------------------------------------------------------------------------

    def attach(self, source: str) -> None:
        self.attach_image(self.opts.load_image(source))

    def attach_image(self, image: PreparedImage) -> None:
        """An image read already, for the next message: its size and context cost said."""
        cost = self.conversation.loaded.session.image_cost(image)
        self.pending.append(image)
        render.info(f"attached {image.source}: {image.size_text('×')}, {plural(cost, 'token')}")
        if render.stderr_is_terminal():
            render.image_preview(*thumbnail(image))

    def cmd_image(self, arg: str) -> None:
        sources = split_words(arg)
        if not sources:
            raise UsageError("/image needs a path", "/image PATH...")
        for source in sources:
            try:
                self.attach(os.path.expanduser(source))
            except LlavaError as exc:  # the rest still attach
                render.error(exc.one_line())

    def cmd_images(self, arg: str) -> None:
        if arg == "clear":
            waiting = plural(len(self.pending), "image")
            render.info(f"detached {waiting} waiting for the next message")
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
            size = image.size_text("×")
            render.info(f"{i}. {image.source}: {size}, {plural(cost, 'token')}{note}")

    def cmd_clear(self, _arg: str) -> None:
        self.conversation.reset()
        self.pending.clear()
        render.info("new conversation")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            render.info(f"system prompt: {self.conversation.system or '(the format default)'}")
            return
        if arg == "-":
            self.conversation.system = self.default_system
            render.info("system prompt reset to the default; it applies to the whole conversation")
        else:
            self.conversation.system = arg
            render.info("system prompt set; it applies to the whole conversation")

    def cmd_retry(self, _arg: str) -> None:
        exchanges = self.conversation.exchanges()
        if not exchanges:
            raise UsageError("nothing to retry yet", "send a message first")
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
            raise UsageError("nothing to undo", "the conversation is empty")
        gone = self.conversation.drop(len(exchanges) - 1)
        render.info(f"dropped: {_preview(gone.prompt)}")

    def as_saved(self) -> transcript.Transcript:
        """The conversation as it is saved: by /save, and as the last chat."""
        model_file = mmproj_file = None
        if self.opts.model is not None and looks_like_path(self.opts.model):
            model_file = str(self.files.model.resolve())
            mmproj_file = str(self.files.mmproj.resolve())
        return transcript.Transcript(
            self.files.name,
            self.conversation.system,
            settings_of(self.sampling),
            transcript.saved_turns(self.conversation.exchanges()),
            model_file=model_file,
            mmproj_file=mmproj_file,
        )

    def cmd_save(self, arg: str) -> None:
        names = split_words(arg)
        if len(names) != 1:
            raise UsageError("/save needs one file name", "/save chat.md or /save chat.json")
        path = Path(names[0]).expanduser()
        record = self.as_saved()
        transcript.save(record, path)
        render.info(f"saved {plural(len(record.turns), 'turn')} to {path}")

    def cmd_load(self, arg: str) -> None:
        names = split_words(arg)
        if len(names) != 1:
            raise UsageError("/load needs one file name", "/load chat.md")
        path = Path(names[0]).expanduser()
        # Everything checked out before anything changes:
        self.restore(resume.read(path, names[0], self.sampling, self.opts.load_image))

    def restore(self, resumed: resume.Resumed) -> None:
        """Go on with a saved chat: its turns, system prompt and settings."""
        saved = resumed.saved
        self.conversation.replace(resumed.exchanges)
        self.conversation.system = saved.system
        self.sampling = resumed.sampling
        self.pending.clear()
        if saved.model and saved.model != self.files.name:
            render.info(f"note: saved with {saved.model}, continuing with {self.files.name}")
        turns = plural(len(resumed.exchanges), "turn")
        render.info(f"loaded {turns} from {resumed.source}")

    def cmd_set(self, arg: str) -> None:
        parts = arg.split()
        if not parts:
            for key, value in settings_of(self.sampling).items():
                render.info(f"{key} {'none' if value is None else value}")  # as /set takes it
            return
        if len(parts) != 2:
            raise UsageError("/set takes a key and a value", "e.g. /set temperature 0.7")
        self.sampling = with_setting(self.sampling, parts[0], parts[1])
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
        n = done.usage.completion_tokens
        speed = rate(n - 1, t.decode_s, "tokens")  # the tokens after the first, in decode time
        render.info(
            f"answer: {plural(n, 'token')}, first token after {t.ttft_s:.2f} s, "
            f"{speed} ({done.finish_reason})"
        )

    def cmd_help(self, _arg: str) -> None:
        for line in help_lines():
            render.info(line)


# Commands after which the last chat is kept again (they change what -c would resume).
_CHANGES_THE_CHAT = frozenset({"/retry", "/undo", "/load", "/system", "/set"})


def _preview(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"

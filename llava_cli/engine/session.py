"""A Session owns one llama context and its KV cache, and evaluates only what is new.

It records what the cache holds as spans (text tokens, generated tokens, images) with their
positions. A new prompt is tokenized exactly as a fresh run would tokenize it; the cache is cut
at the first token (or image) that differs, and only the rest is evaluated. So the cache always
equals what evaluating the prompt from scratch would give, without the cost.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

from ..errors import ContextOverflow, EngineError, ImageError
from ..options import SamplingParams
from ..templates import MEDIA_MARKER
from ..textstream import TextStream
from ..units import plural
from .grammar import TokenPicker
from .model import Engine, flash_attn_type
from .native import INTERRUPTS, LOGS

_SEQ = 0


class Bitmap(Protocol):
    """An image ready for libmtmd: 8-bit RGB pixels and a key identifying their content."""

    @property
    def key(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def rgb(self) -> bytes: ...


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # the whole prompt, image tokens included
    image_tokens: int  # of those, from images
    cached_tokens: int  # of those, reused from the KV cache instead of evaluated
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    load_s: float
    image_encode_s: float
    prefill_s: float
    ttft_s: float
    decode_s: float
    decode_tokens_per_s: float


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of answer or stop string), "length", or "interrupted"
    seed: int
    usage: Usage
    timings: Timings


class StateStore(Protocol):
    """Where prefix states are kept between runs (``llava_cli.cache.PrefixCache``). ``get(key)``
    returns only an entry that was saved under ``key``, verified."""

    def get(self, key: str) -> tuple[dict[str, Any], memoryview] | None: ...
    def put(self, key: str, meta: dict[str, Any], payload: memoryview) -> None: ...
    def fits(self, size: int) -> bool: ...


@dataclass
class Counters:
    """Cumulative work done by a session; tests read these to prove what was (not) redone."""

    text_tokens_evaluated: int = 0
    image_tokens_evaluated: int = 0
    image_chunks_encoded: int = 0
    tokens_generated: int = 0
    prefixes_restored: int = 0  # from the prefix cache, instead of encoding and prefilling

    def snapshot(self) -> Counters:
        return Counters(**vars(self))


@dataclass
class _Span:
    kind: str  # "text" | "gen" | "image"
    pos_start: int
    pos_end: int
    tokens: list[int] = field(default_factory=list)  # text and gen: one position each
    key: str = ""  # image: its key
    image_cells: int = 0  # image: KV cells (M-RoPE images take fewer positions than cells)

    @property
    def cells(self) -> int:
        return self.image_cells if self.kind == "image" else len(self.tokens)


@dataclass
class _Turn:
    started: float
    prompt_tokens: int = 0
    image_tokens: int = 0
    cached_tokens: int = 0
    image_encode_s: float = 0.0
    prefill_s: float = 0.0


PREFIX_FORMAT = 2  # of saved prefix states; a change makes every old entry a miss
_Item = list[int] | Bitmap  # a prompt, tokenized: runs of text tokens and images


class Session:
    """One conversation's KV cache. ``evaluate`` a prompt, then ``generate`` the answer."""

    def __init__(self, engine: Engine, n_ctx: int) -> None:
        self.engine = engine
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = engine.opts.n_batch
        params.n_ubatch = engine.opts.n_batch
        params.n_threads = engine.n_threads
        params.n_threads_batch = engine.n_threads
        params.flash_attn_type = flash_attn_type(engine.opts.flash_attn)
        params.no_perf = False
        with INTERRUPTS.native():
            self.ctx = llama_cpp.llama_init_from_model(engine.model, params)
        if not self.ctx:
            raise EngineError(
                f"llama.cpp could not create a context of {n_ctx} tokens: {LOGS.last_error()}",
                "try a smaller --ctx",
            )
        llama_cpp.llama_set_abort_callback(self.ctx, INTERRUPTS.abort_callback, None)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.n_batch = int(llama_cpp.llama_n_batch(self.ctx))  # llama.cpp may lower it
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.spans: list[_Span] = []
        self.counters = Counters()
        self._turn: _Turn | None = None
        self._saved_logits: tuple[list[int | str], bytes] | None = None
        # The last prompt evaluated (text, image keys, add_special), while the cache still
        # holds it followed by its answer: the next prompt can then keep the answer's tokens.
        self._last_prompt: tuple[str, list[str], bool] | None = None
        self.state_store: StateStore | None = None  # the prefix cache between runs, if any
        self.state_salt = ""  # what saved states depend on beyond the tokens (Engine.identity)
        self._writer: threading.Thread | None = None
        self.last: Completion | None = None
        # Special tokens generation writes out (a thinking model's block delimiters).
        self.shown_tokens: frozenset[int] = frozenset()
        # Told what the evaluation is doing ("encoding image 1 of 2", "reading the prompt"),
        # for a status line; never called during generation.
        self.on_progress: Callable[[str], None] | None = None

    @property
    def n_past(self) -> int:
        """The next position."""
        return self.spans[-1].pos_end if self.spans else 0

    @property
    def n_cells(self) -> int:
        """KV cells in use (equals n_past except for M-RoPE images)."""
        return sum(s.cells for s in self.spans)

    def image_tokens(self, key: str) -> int:
        """Context tokens the image with this key takes in the cache (0 if it is not there)."""
        return next((s.cells for s in self.spans if s.kind == "image" and s.key == key), 0)

    def tokens(self) -> list[int | str]:
        """What the cache holds: token ids, and image keys for images."""
        out: list[int | str] = []
        for span in self.spans:
            out += [span.key] if span.kind == "image" else span.tokens
        return out

    def close(self) -> None:
        self.flush()
        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, prompt: str, images: Sequence[Bitmap], *, add_special: bool) -> None:
        """Bring the KV cache to ``prompt`` (images at MEDIA_MARKER), evaluating only what is new.

        ``add_special``: the tokenizer adds BOS (when the rendered prompt does not carry it).
        """
        with INTERRUPTS.native():
            self._evaluate(prompt, images, add_special=add_special)

    def count(self, prompt: str, images: Sequence[Bitmap], *, add_special: bool) -> int:
        """The context cells ``prompt`` takes as a whole (cached or not): tokenizing only."""
        with INTERRUPTS.native():
            return sum(
                len(item) if isinstance(item, list) else self.image_cost(item)
                for item in self._items(prompt, images, add_special=add_special)
            )

    def image_cost(self, image: Bitmap) -> int:
        """Context cells an image takes: known if it is in the cache, else from libmtmd's
        preprocessing (which resizes and tiles the image, but does not encode it)."""
        if cached := self.image_tokens(image.key):
            return cached
        chunks = self._chunks(image)
        try:
            return int(mtmd.mtmd_helper_get_n_tokens(chunks))
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def _items(self, prompt: str, images: Sequence[Bitmap], *, add_special: bool) -> list[_Item]:
        texts = prompt.split(MEDIA_MARKER)
        if len(texts) != len(images) + 1:
            raise EngineError(f"prompt has {len(texts) - 1} image markers for {len(images)} images")
        items: list[_Item] = []
        for i, text in enumerate(texts):
            if text:
                first = add_special and not items
                if tokens := self.engine.tokenize(text, add_special=first):
                    items.append(tokens)
            elif add_special and not items and self.engine.bos_token >= 0:
                items.append([self.engine.bos_token])
            if i < len(images):
                items.append(images[i])
        if not items or not isinstance(items[-1], list):
            raise EngineError("a prompt must end in text, not an image")
        return items

    def _evaluate(self, prompt: str, images: Sequence[Bitmap], *, add_special: bool) -> None:
        self._turn = turn = _Turn(started=time.perf_counter())
        items = self._continue(prompt, images, add_special=add_special)
        if items is None:
            items = self._items(prompt, images, add_special=add_special)
        self._last_prompt = None
        prefix, prefix_key = self._prefix(items), None
        if prefix is not None:
            prefix_key = _prefix_key(self.state_salt, prefix)
            if self.tokens()[: len(prefix)] != prefix:  # a saved prefix beats evaluating it
                self._restore_prefix(prefix_key, prefix)
        rest = self._cut(items)
        turn.cached_tokens = self.n_cells
        if not rest and not self._restore_logits():
            self._refresh_logits()
            turn.cached_tokens -= 1
        # Tokenize the images first, so a prompt that cannot fit fails before any work.
        planned: list[list[int] | tuple[Bitmap, Any]] = []
        try:
            for item in rest:
                planned.append(item if isinstance(item, list) else (item, self._chunks(item)))
            need = sum(
                len(p) if isinstance(p, list) else int(mtmd.mtmd_helper_get_n_tokens(p[1]))
                for p in planned
            )
            if self.n_cells + need > self.n_ctx:
                raise ContextOverflow(
                    f"the prompt needs {self.n_cells + need} tokens but the context holds "
                    f"{self.n_ctx}",
                    "raise --ctx, or send fewer or smaller images",
                )
            last_image = max(
                (i for i, p in enumerate(planned) if not isinstance(p, list)), default=-1
            )
            n_images, seen = sum(not isinstance(p, list) for p in planned), 0
            for i, p in enumerate(planned):
                if isinstance(p, list):
                    self._progress(f"reading the prompt ({plural(len(p), 'token')})")
                    self._eval_tokens(p, "text", logits=i == len(planned) - 1)
                else:
                    seen += 1
                    numbered = f" {seen} of {n_images}" if n_images > 1 else ""
                    self._eval_image(p[0].key, p[1], f"image{numbered}")
                    if i == last_image and prefix_key is not None:
                        self._save_prefix(prefix_key)
        finally:
            for p in planned:
                if not isinstance(p, list):
                    mtmd.mtmd_input_chunks_free(p[1])
        turn.prompt_tokens = self.n_cells
        turn.image_tokens = sum(s.cells for s in self.spans if s.kind == "image")
        if rest:
            self._save_logits()
        self._last_prompt = (prompt, [image.key for image in images], add_special)

    def _progress(self, what: str) -> None:
        if self.on_progress is not None:
            self.on_progress(what)

    # -- the prefix cache between runs ----------------------------------------------------------

    def _prefix(self, items: Sequence[_Item]) -> list[int | str] | None:
        """Tokens and image keys up to the prompt's last image: what a saved state holds.
        None without a store, or without an image."""
        if self.state_store is None:
            return None
        last = max((i for i, item in enumerate(items) if not isinstance(item, list)), default=-1)
        return _flat(items[: last + 1]) if last >= 0 else None

    def _save_prefix(self, key: str) -> None:
        """Keep the cache as it is now (it ends with the prefix) for the next run.

        Only a prefix evaluated in batches, as a fresh run evaluates it: one that holds an
        answer's generated tokens (a later chat turn) is not kept, so a restored state is
        always the one ``--no-cache`` would compute.
        """
        store = self.state_store
        assert store is not None
        if any(span.kind == "gen" for span in self.spans):
            return
        size = int(llama_cpp.llama_state_seq_get_size(self.ctx, _SEQ))
        if not store.fits(size):
            return
        try:
            buf = (ctypes.c_uint8 * size)()
            written = int(llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, _SEQ))
        except MemoryError:  # the answer matters more than keeping its prefix
            return
        if not written:
            return
        meta = {"spans": [asdict(span) for span in self.spans]}
        payload = memoryview(buf).cast("B")[:written]  # the one copy, handed to the writer
        self.flush()  # one write at a time: a batch of new images never piles up copies
        # Hashing and writing happen beside the answer, not before its first token.
        self._writer = threading.Thread(
            target=self._write_prefix, args=(self.state_store, key, meta, payload)
        )
        self._writer.start()

    @staticmethod
    def _write_prefix(
        store: StateStore, key: str, meta: dict[str, Any], payload: memoryview
    ) -> None:
        try:
            store.put(key, meta, payload)
        except Exception as exc:  # a full disk costs the next run time, not this answer
            LOGS.note(f"prefix cache: could not save ({exc})")

    def flush(self) -> None:
        """Wait for a prefix still being written to the cache."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None

    def _restore_prefix(self, key: str, prefix: list[int | str]) -> None:
        """Replace the cache with a saved state of exactly ``prefix``, if there is one."""
        assert self.state_store is not None
        entry = self.state_store.get(key)
        if entry is None:
            return
        meta, payload = entry  # saved under this key (the store checks the entry names it)
        try:
            spans = [_Span(**span) for span in meta["spans"]]
            held = [t for s in spans for t in ([s.key] if s.kind == "image" else s.tokens)]
        except (KeyError, TypeError):
            return
        if held != prefix:
            return  # not this prompt's prefix after all: ignore it
        started = time.perf_counter()
        buf = (ctypes.c_uint8 * len(payload)).from_buffer(payload)  # no copy
        llama_cpp.llama_memory_clear(self.mem, True)
        self.spans = []
        if not llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(payload), _SEQ):
            llama_cpp.llama_memory_clear(self.mem, True)  # refused (another build?): a miss
            LOGS.forget_last()
            return
        self.spans = spans
        self.counters.prefixes_restored += 1
        if self._turn is not None:
            self._turn.prefill_s += time.perf_counter() - started

    def _continue(
        self, prompt: str, images: Sequence[Bitmap], *, add_special: bool
    ) -> list[_Item] | None:
        """``prompt`` as the cache already holds it, when it goes on from the last prompt and
        its answer: the answer keeps the tokens that were generated, however a fresh tokenizer
        would split the same text, so a follow-up evaluates only its own tokens."""
        last = self._last_prompt
        if last is None or not self.spans:
            return None
        old_text, old_keys, old_special = last
        n_old = len(old_keys)
        if add_special != old_special or not prompt.startswith(old_text):
            return None
        if [image.key for image in images[:n_old]] != old_keys:
            return None
        answered = self.spans[-1].kind == "gen"
        if prompt == old_text:  # the same prompt again (a retry): exactly what the cache holds
            return self._held(self.spans[:-1] if answered else self.spans, images)
        if not answered:
            return None
        tail = prompt[len(old_text) :].encode("utf-8", "replace")
        used, kept = 0, []
        for token in self.spans[-1].tokens:
            piece = self.engine.token_piece(token, special=token in self.shown_tokens)
            if not piece or not tail.startswith(piece, used):
                break
            used += len(piece)
            kept.append(token)
        try:
            rest = tail[used:].decode("utf-8")
        except UnicodeDecodeError:  # the answer's text stops inside a character
            return None
        if not kept or not rest:
            return None
        return _runs(
            [
                *self._held(self.spans[:-1], images[:n_old]),
                kept,
                *self._items(rest, images[n_old:], add_special=False),
            ]
        )

    @staticmethod
    def _held(spans: Sequence[_Span], images: Sequence[Bitmap]) -> list[_Item]:
        """What these spans hold, as prompt items (the images in the order they appear)."""
        pictures = iter(images)
        return _runs([next(pictures) if s.kind == "image" else s.tokens for s in spans])

    def _cut(self, items: Sequence[_Item]) -> list[_Item]:
        """Cut the cache where it stops matching ``items``; return the items still to evaluate."""
        spans = self.spans
        j = t = 0  # the first span (and token within it) that does not match yet
        rest: list[_Item] = []
        for idx, item in enumerate(items):
            if not isinstance(item, list):
                span = spans[j] if j < len(spans) else None
                if t == 0 and span and span.kind == "image" and span.key == item.key:
                    j += 1
                    continue
                rest = list(items[idx:])
                break
            k = 0
            while k < len(item) and j < len(spans) and spans[j].kind != "image":
                if spans[j].tokens[t] != item[k]:
                    break
                k, t = k + 1, t + 1
                if t == len(spans[j].tokens):
                    j, t = j + 1, 0
            run_goes_on = t > 0 or (j < len(spans) and spans[j].kind != "image")
            if k < len(item) or run_goes_on:
                rest = [item[k:]] if k < len(item) else []
                rest += items[idx + 1 :]
                break
        if self._trim(j, t):
            return rest
        # This cache cannot be cut there (a recurrent or sliding-window model): start over.
        llama_cpp.llama_memory_clear(self.mem, True)
        self.spans.clear()
        return list(items)

    def _trim(self, keep_spans: int, keep_tokens: int) -> bool:
        """Keep ``keep_spans`` spans plus ``keep_tokens`` of the next; False if refused."""
        if keep_tokens:
            span = self.spans[keep_spans]
            del span.tokens[keep_tokens:]
            span.pos_end = span.pos_start + keep_tokens
            keep_spans += 1
        del self.spans[keep_spans:]
        kv_end = int(llama_cpp.llama_memory_seq_pos_max(self.mem, _SEQ)) + 1
        if self.n_past >= kv_end:
            return True
        return bool(llama_cpp.llama_memory_seq_rm(self.mem, _SEQ, self.n_past, -1))

    def _save_logits(self) -> None:
        """Keep the prompt's last logits: regenerating the same answer (``/retry``) then
        needs no decode at all, not even of the prompt's last token."""
        row = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        size = self.engine.n_vocab * ctypes.sizeof(ctypes.c_float)
        self._saved_logits = (self.tokens(), ctypes.string_at(row, size))

    def _restore_logits(self) -> bool:
        """Put the saved logits back if the cache ends exactly where they were taken."""
        saved = self._saved_logits
        if saved is None or saved[0] != self.tokens() or not self.spans:
            return False
        row = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        if not row:
            return False
        ctypes.memmove(row, saved[1], len(saved[1]))
        return True

    def _refresh_logits(self) -> None:
        """The whole prompt is cached, but sampling needs its logits: redo its last token."""
        span = self.spans[-1]
        token = span.tokens.pop()
        span.pos_end -= 1
        if not span.tokens:
            self.spans.pop()
        llama_cpp.llama_memory_seq_rm(self.mem, _SEQ, self.n_past, -1)
        self._eval_tokens([token], span.kind, logits=True)

    def _eval_tokens(self, tokens: list[int], kind: str, *, logits: bool) -> None:
        """Decode text ("text") or generated ("gen") tokens at the end of the cache."""
        start, pos = time.perf_counter(), self.n_past
        self._decode(tokens, pos, logits=logits)
        last = self.spans[-1] if self.spans else None
        if last is not None and last.kind == kind:
            last.tokens += tokens
            last.pos_end += len(tokens)
        else:
            self.spans.append(_Span(kind, pos, pos + len(tokens), list(tokens)))
        if kind == "text":
            self.counters.text_tokens_evaluated += len(tokens)
            if self._turn:
                self._turn.prefill_s += time.perf_counter() - start

    def _decode(self, tokens: list[int], pos: int, *, logits: bool) -> None:
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset : offset + self.n_batch]
            b = self.batch
            b.n_tokens = len(chunk)
            for k, tok in enumerate(chunk):
                b.token[k] = tok
                b.pos[k] = pos + offset + k
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = _SEQ
                b.logits[k] = 0
            b.logits[len(chunk) - 1] = int(logits and offset + self.n_batch >= len(tokens))
            rc = llama_cpp.llama_decode(self.ctx, b)
            if rc != 0:
                INTERRUPTS.check()  # an abort from Ctrl-C
                raise EngineError(f"llama_decode failed ({rc}): {LOGS.last_error()}")

    def _chunks(self, image: Bitmap) -> Any:
        """libmtmd's chunks for one image: its wrapper text tokens and its image tokens."""
        if len(image.rgb) != image.width * image.height * 3:
            raise ImageError(f"image {image.key[:12]} has a wrong pixel buffer size")
        # libmtmd copies the pixels; hand it the bytes' own buffer rather than a second copy.
        pixels = ctypes.cast(ctypes.c_char_p(image.rgb), ctypes.POINTER(ctypes.c_uint8))
        bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, pixels)
        if not bitmap:
            raise ImageError(f"libmtmd rejected an image of {image.width}x{image.height} pixels")
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            mtmd.mtmd_bitmap_set_id(bitmap, image.key.encode())
            text = mtmd.mtmd_input_text()
            marker = MEDIA_MARKER.encode()
            text.text, text.text_len = marker, len(marker)
            text.add_special, text.parse_special = False, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mtmd.mtmd_tokenize(self.engine.mctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                mtmd.mtmd_input_chunks_free(chunks)
                raise ImageError(
                    f"libmtmd could not preprocess an image of {image.width}x{image.height} "
                    f"pixels (error {rc}): {LOGS.last_error()}"
                )
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        return chunks

    def _eval_image(self, key: str, chunks: Any, label: str = "image") -> None:
        """Decode one image's chunks, encoding its pixels only if never seen before."""
        turn = self._turn
        start_pos = pos = self.n_past
        cells = 0
        for idx in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, idx)
            n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            cells += n_tokens
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                self._decode([ptr[k] for k in range(n.value)], pos, logits=False)
                pos += n.value
                continue
            embd = self.engine.embeddings.get((key, idx))
            if embd is None:
                self._progress(f"encoding {label}")
                t0 = time.perf_counter()
                if mtmd.mtmd_encode_chunk(self.engine.mctx, chunk) != 0:
                    raise EngineError(f"image encoding failed: {LOGS.last_error()}")
                INTERRUPTS.check()
                embd = (ctypes.c_float * (n_tokens * self.engine.n_embd))()
                ctypes.memmove(
                    embd, mtmd.mtmd_get_output_embd(self.engine.mctx), ctypes.sizeof(embd)
                )
                self.engine.embeddings.put((key, idx), embd)
                self.counters.image_chunks_encoded += 1
                if turn:
                    turn.image_encode_s += time.perf_counter() - t0
            self._progress(f"adding {label} to the context")
            t0 = time.perf_counter()
            new_pos = llama_cpp.llama_pos(0)
            rc = mtmd.mtmd_helper_decode_image_chunk(
                self.engine.mctx, self.ctx, chunk, embd, pos, _SEQ, self.n_batch,
                ctypes.byref(new_pos), mtmd.mtmd_helper_post_decode_callback(), None,
            )  # fmt: skip
            if rc != 0:
                INTERRUPTS.check()
                raise EngineError(f"decoding image embeddings failed ({rc}): {LOGS.last_error()}")
            pos = int(new_pos.value)
            self.counters.image_tokens_evaluated += n_tokens
            if turn:
                turn.prefill_s += time.perf_counter() - t0
        self.spans.append(_Span("image", start_pos, pos, key=key, image_cells=cells))

    # -- generation ---------------------------------------------------------------------------

    def generate(self, params: SamplingParams) -> Generator[str, None, None]:
        """Stream the answer to the evaluated prompt. ``self.last`` holds the result after,
        also when the consumer stops early or Ctrl-C interrupts (finish_reason "interrupted")."""
        turn = self._turn or _Turn(started=time.perf_counter())
        self._turn = None
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        chain = _build_sampler(params, seed, self.engine.n_vocab)
        picker = TokenPicker(self.engine, chain, params.grammar, self.shown_tokens)
        stream = TextStream(params.stop)
        limit = params.max_tokens if params.max_tokens is not None else self.n_ctx
        n_gen = 0
        finish = "interrupted"
        first_at = 0.0
        try:
            while True:
                with INTERRUPTS.native():
                    token = picker.sample(self.ctx)
                first_at = first_at or time.perf_counter()
                if self.engine.is_end(token):
                    finish = "stop"
                    break
                n_gen += 1
                self.counters.tokens_generated += 1
                if text := stream.feed(
                    self.engine.token_piece(token, special=token in self.shown_tokens)
                ):
                    yield text
                if stream.stopped:
                    finish = "stop"
                    break
                if n_gen >= limit or self.n_cells >= self.n_ctx:
                    finish = "length"
                    break
                with INTERRUPTS.native():
                    self._eval_tokens([token], "gen", logits=True)
            if tail := stream.finish():
                yield tail
        finally:
            picker.close()
            end = time.perf_counter()
            first_at = first_at or end
            decode_s = end - first_at
            self.last = Completion(
                text=stream.text,
                finish_reason=finish,
                seed=seed,
                usage=Usage(turn.prompt_tokens, turn.image_tokens, turn.cached_tokens, n_gen),
                timings=Timings(
                    load_s=self.engine.load_s,
                    image_encode_s=turn.image_encode_s,
                    prefill_s=turn.prefill_s,
                    ttft_s=first_at - turn.started,
                    decode_s=decode_s,
                    decode_tokens_per_s=(n_gen - 1) / decode_s if n_gen > 1 and decode_s else 0.0,
                ),
            )


def _flat(items: Sequence[_Item]) -> list[int | str]:
    """Items as ``Session.tokens`` lists them: token ids, and image keys for images."""
    out: list[int | str] = []
    for item in items:
        out += item if isinstance(item, list) else [item.key]
    return out


def _prefix_key(salt: str, prefix: list[int | str]) -> str:
    text = json.dumps([PREFIX_FORMAT, salt, prefix], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _runs(parts: Sequence[_Item]) -> list[_Item]:
    """Join neighbouring token lists: ``_cut`` expects one run of tokens between images."""
    items: list[_Item] = []
    for part in parts:
        if isinstance(part, list) and items and isinstance(items[-1], list):
            items[-1] = [*items[-1], *part]
        else:
            items.append(list(part) if isinstance(part, list) else part)
    return items


def _build_sampler(params: SamplingParams, seed: int, n_vocab: int) -> Any:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if params.repeat_penalty != 1.0 and params.repeat_last_n != 0:
        penalties = llama_cpp.llama_sampler_init_penalties(
            n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0
        )
        add(chain, penalties)
    if params.temperature <= 0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain

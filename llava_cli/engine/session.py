"""A Session owns one llama context and its KV cache, and evaluates only what is new.

It records what the cache holds as spans (text tokens, generated tokens, images) with their
positions. A new prompt is tokenized exactly as a fresh run would tokenize it; the cache is cut
at the first token (or image) that differs, and only the rest is evaluated. So the cache always
equals what evaluating the prompt from scratch would give, without the cost. The matching is in
prefix_match.py, the states kept between runs in prefix_states.py, the sampler in sampling.py.
"""

from __future__ import annotations

import ctypes
import random
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

from ..errors import ContextOverflow, EngineError
from ..options import SamplingParams
from ..textstream import TextStream
from ..units import plural
from .decoding import (
    TokenBatch,
    chunk_text_tokens,
    decode_image_chunk,
    encode_image_chunk,
    image_chunks,
)
from .model import Engine, flash_attn_type
from .native import INTERRUPTS, LOGS
from .prefix_match import (
    EvaluatedPrompt,
    PromptItem,
    Span,
    first_difference,
    prefix_through_last_image,
    reuse_answer_tokens,
    span_ids_and_keys,
    tokenize_prompt,
)
from .prefix_states import (
    StateStore,
    StateWriter,
    copy_state,
    load_state,
    prefix_key,
    spans_from_meta,
    spans_meta,
)
from .records import Bitmap, Completion, Counters, Turn
from .sampling import TokenPicker, build_sampler_chain

_SEQ = 0  # the one sequence of a session's cache


class Session:
    """One conversation's KV cache. ``evaluate`` a prompt, then ``generate`` the answer."""

    def __init__(self, engine: Engine, n_ctx: int) -> None:
        engine.check_context_fits(n_ctx)  # before llama.cpp allocates the cache
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
        self.batch = TokenBatch(self.ctx, self.n_batch, _SEQ)
        self.spans: list[Span] = []
        self._image_costs: dict[str, int] = {}  # image key: cells, as preprocessing found
        self.counters = Counters()
        self._turn: Turn | None = None
        self._saved_logits: tuple[list[int | str], bytes] | None = None
        # The last prompt evaluated, while the cache still holds it followed by its answer:
        # the next prompt can then keep the answer's tokens.
        self._last_prompt: EvaluatedPrompt | None = None
        self.state_store: StateStore | None = None  # the prefix cache between runs, if any
        self.state_salt = ""  # what saved states depend on beyond the tokens (Engine.identity)
        self._state_writer = StateWriter()
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
        return span_ids_and_keys(self.spans)

    def flush(self) -> None:
        """Wait for a prefix still being written to the prefix cache."""
        self._state_writer.flush()

    def close(self) -> None:
        self.flush()
        if self.ctx:
            self.batch.free()
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
                for item in tokenize_prompt(prompt, images, self.engine, add_special=add_special)
            )

    def image_cost(self, image: Bitmap) -> int:
        """Context cells an image takes: known if it is in the cache, else from libmtmd's
        preprocessing (which resizes and tiles the image, but does not encode it)."""
        if cached := self.image_tokens(image.key) or self._image_costs.get(image.key):
            return cached  # making room in a full chat measures the same images many times
        chunks = image_chunks(self.engine.mctx, image)
        try:
            cost = int(mtmd.mtmd_helper_get_n_tokens(chunks))
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        if len(self._image_costs) < 4096:
            self._image_costs[image.key] = cost
        return cost

    def _evaluate(self, prompt: str, images: Sequence[Bitmap], *, add_special: bool) -> None:
        self._turn = turn = Turn(started=time.perf_counter())
        items = reuse_answer_tokens(
            self._last_prompt, self.spans, prompt, images, self.engine, self.shown_tokens,
            add_special=add_special,
        )  # fmt: skip
        if items is None:
            items = tokenize_prompt(prompt, images, self.engine, add_special=add_special)
        self._last_prompt = None
        prefix = prefix_through_last_image(items) if self.state_store is not None else None
        saved_prefix_key = None
        if prefix is not None:
            saved_prefix_key = prefix_key(self.state_salt, prefix)
            if self.tokens()[: len(prefix)] != prefix:  # a saved prefix beats evaluating it
                self._restore_prefix(saved_prefix_key, prefix)
        rest = self._cut_at_first_difference(items)
        turn.cached_tokens = self.n_cells
        if not rest and not self._restore_logits():
            self._refresh_logits()
            turn.cached_tokens -= 1
            self._save_logits()  # the same prompt again (/retry) then decodes nothing
        self._eval_items(rest, saved_prefix_key)
        turn.prompt_tokens = self.n_cells
        turn.image_tokens = sum(s.cells for s in self.spans if s.kind == "image")
        if rest:
            self._save_logits()
        self._last_prompt = EvaluatedPrompt(prompt, [image.key for image in images], add_special)

    def _eval_items(self, items: list[PromptItem], saved_prefix_key: str | None) -> None:
        """Evaluate the prompt's new items at the end of the cache, saving the prefix through
        their last image under ``saved_prefix_key`` (if any) as soon as it is evaluated."""
        # Tokenize the images first, so a prompt that cannot fit fails before any work.
        planned: list[list[int] | tuple[Bitmap, Any]] = []
        try:
            for item in items:
                planned.append(
                    item if isinstance(item, list) else (item, image_chunks(self.engine.mctx, item))
                )
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
                    if i == last_image and saved_prefix_key is not None:
                        self._save_prefix(saved_prefix_key)
        finally:
            for p in planned:
                if not isinstance(p, list):
                    mtmd.mtmd_input_chunks_free(p[1])

    def _progress(self, what: str) -> None:
        if self.on_progress is not None:
            self.on_progress(what)

    def _cut_at_first_difference(self, items: Sequence[PromptItem]) -> list[PromptItem]:
        """Cut the cache where it stops matching ``items``; return the items still to evaluate."""
        keep_spans, keep_tokens, rest = first_difference(self.spans, items)
        if self._keep_only(keep_spans, keep_tokens):
            return rest
        # This cache cannot be cut there (a recurrent or sliding-window model): start over.
        llama_cpp.llama_memory_clear(self.mem, True)
        self.spans.clear()
        return list(items)

    def _keep_only(self, keep_spans: int, keep_tokens: int) -> bool:
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

    # -- the prefix cache between runs ----------------------------------------------------------

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
        payload = copy_state(self.ctx, _SEQ, store)  # the one copy, handed to the writer
        if payload is None:
            return
        # Hashing and writing happen beside the answer, not before its first token.
        self._state_writer.start(store, key, spans_meta(self.spans), payload)

    def _restore_prefix(self, key: str, prefix: list[int | str]) -> None:
        """Replace the cache with a saved state of exactly ``prefix``, if there is one."""
        assert self.state_store is not None
        entry = self.state_store.get(key)
        if entry is None:
            return
        meta, payload = entry  # saved under this key (the store checks the entry names it)
        saved = spans_from_meta(meta)
        if saved is None:
            return
        spans, held = saved
        if held != prefix:
            return  # not this prompt's prefix after all: ignore it
        started = time.perf_counter()
        self.spans = []
        if not load_state(self.ctx, self.mem, _SEQ, payload):
            return  # refused: a miss, and the cache is empty
        self.spans = spans
        self.counters.prefixes_restored += 1
        if self._turn is not None:
            self._turn.prefill_s += time.perf_counter() - started

    # -- logits, tokens and images --------------------------------------------------------------

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
        self.batch.decode(tokens, pos, logits=logits)
        last = self.spans[-1] if self.spans else None
        if last is not None and last.kind == kind:
            last.tokens += tokens
            last.pos_end += len(tokens)
        else:
            self.spans.append(Span(kind, pos, pos + len(tokens), list(tokens)))
        if kind == "text":
            self.counters.text_tokens_evaluated += len(tokens)
            if self._turn:
                self._turn.prefill_s += time.perf_counter() - start

    def _eval_image(self, key: str, chunks: Any, label: str = "image") -> None:
        """Decode one image's chunks, encoding its pixels only if never seen before."""
        turn, mctx = self._turn, self.engine.mctx
        start_pos = pos = self.n_past
        cells = 0
        for idx in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, idx)
            n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            cells += n_tokens
            if (text_tokens := chunk_text_tokens(chunk)) is not None:
                self.batch.decode(text_tokens, pos, logits=False)
                pos += len(text_tokens)
                continue
            embd = self.engine.embeddings.get((key, idx))
            if embd is None:
                self._progress(f"encoding {label}")
                t0 = time.perf_counter()
                embd = encode_image_chunk(mctx, chunk, n_tokens, self.engine.n_embd)
                self.engine.embeddings.put((key, idx), embd)
                self.counters.image_chunks_encoded += 1
                if turn:
                    turn.image_encode_s += time.perf_counter() - t0
            self._progress(f"adding {label} to the context")
            t0 = time.perf_counter()
            pos = decode_image_chunk(mctx, self.ctx, chunk, embd, pos, _SEQ, self.n_batch)
            self.counters.image_tokens_evaluated += n_tokens
            if turn:
                turn.prefill_s += time.perf_counter() - t0
        self.spans.append(Span("image", start_pos, pos, key=key, image_cells=cells))

    # -- generation ---------------------------------------------------------------------------

    def generate(self, params: SamplingParams) -> Generator[str, None, None]:
        """Stream the answer to the evaluated prompt. ``self.last`` holds the result after,
        also when the consumer stops early or Ctrl-C interrupts (finish_reason "interrupted")."""
        turn = self._turn or Turn(started=time.perf_counter())
        self._turn = None
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        chain = build_sampler_chain(params, seed, self.engine.n_vocab)
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
            self.last = turn.completion(
                stream.text, finish, seed, n_generated=n_gen, load_s=self.engine.load_s,
                first_token_at=first_at or end, ended_at=end,
            )  # fmt: skip

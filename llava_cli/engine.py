"""The only importer of llama_cpp: model loading, a KV-owning Session, sampling, log routing.

``Engine`` holds the weights (text model + libmtmd projector). ``Session`` owns one llama
context and its KV cache. It remembers what it has evaluated as a list of spans (text, image,
generated tokens) with their positions; each new prompt is compared against those spans, the KV
cache is trimmed to the longest common prefix, and only the rest is evaluated. Nothing is ever
reset, and an image's embeddings are kept so the same picture is never encoded twice.

We drive libmtmd directly (``mtmd_tokenize``, ``mtmd_encode_chunk``,
``mtmd_helper_decode_image_chunk``) instead of llama-cpp-python's chat handlers, which clear the
KV cache and re-encode every image on every call.
"""

from __future__ import annotations

import ctypes
import os
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

from .errors import ContextOverflow, EngineError, ImageError, ModelFileError
from .gguf_file import GGUFInfo, check_pair, read_gguf
from .options import SamplingParams
from .templates import MEDIA_MARKER
from .textstream import TextStream

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
class LoadOptions:
    model: Path
    mmproj: Path
    n_threads: int = 0  # 0: one per available CPU
    n_batch: int = 512
    gpu_layers: int = -1  # -1: all layers, where the build supports offload
    image_on_cpu: bool = False
    flash_attn: bool | None = None  # None: let llama.cpp decide
    verbose: bool = False


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # the whole prompt, image tokens included
    image_tokens: int
    cached_tokens: int  # prompt tokens reused from the KV cache instead of evaluated
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
    finish_reason: str  # "stop" (end of sequence or stop string) or "length"
    seed: int
    usage: Usage
    timings: Timings


@dataclass
class Counters:
    """Cumulative work done by a session; tests read these to prove what was (not) redone."""

    text_tokens_evaluated: int = 0
    image_tokens_evaluated: int = 0
    image_chunks_encoded: int = 0
    tokens_generated: int = 0

    def snapshot(self) -> Counters:
        return Counters(**vars(self))


# ---------------------------------------------------------------------------------------------
# Logging: llama.cpp, ggml and libmtmd all print unless told otherwise.


_LOG_DEBUG, _LOG_WARN, _LOG_CONT = 1, 3, 5  # ggml_log_level


class _LogRouter:
    """Routes native log lines to stderr when verbose; otherwise keeps the last few for errors."""

    def __init__(self) -> None:
        self.verbose = False
        self.debug = os.environ.get("LLAVA_DEBUG", "") not in ("", "0")
        self._level = 0
        self.recent: deque[str] = deque(maxlen=64)
        self.callback = llama_cpp.llama_log_callback(self._on_log)
        self.installed = False

    def _on_log(self, level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
        if level != _LOG_CONT:
            self._level = level
        message = text.decode("utf-8", errors="replace") if text else ""
        if self.verbose and (self._level != _LOG_DEBUG or self.debug):
            sys.stderr.write(message)
            sys.stderr.flush()
        if self._level >= _LOG_WARN and message.strip():
            self.recent.append(message.strip())

    def install(self, verbose: bool) -> None:
        self.verbose = verbose
        if not self.installed:
            llama_cpp.llama_log_set(self.callback, None)
            mtmd.mtmd_log_set(self.callback, None)
            mtmd.mtmd_helper_log_set(self.callback, None)
            llama_cpp.llama_backend_init()
            self.installed = True

    def last_error(self) -> str:
        for line in reversed(self.recent):
            if "error" in line.lower() or "fail" in line.lower() or "mismatch" in line:
                return line.split(": ", 1)[-1] if ": " in line else line
        return self.recent[-1] if self.recent else ""


_LOGS = _LogRouter()


def backend_info() -> dict[str, Any]:
    """What this llama.cpp build can do, for ``llava doctor`` and the chat header."""
    _LOGS.install(_LOGS.verbose)
    system = (llama_cpp.llama_print_system_info() or b"").decode("utf-8", errors="replace")
    # "CUDA : ARCHS = 890 | … | CPU : SSE3 = 1 | AVX2 = 1 | …": one section per backend.
    sections: dict[str, list[str]] = {}
    current = "CPU"
    for field_text in system.split("|"):
        entry = field_text
        if " : " in entry:
            header, _, entry = entry.partition(" : ")
            current = header.strip()
            sections.setdefault(current, [])
        key, _, value = entry.partition("=")
        if value.strip() == "1":
            sections.setdefault(current, []).append(key.strip())
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    backends = [name for name in sections if name != "CPU"] or ["CPU"]
    features = sections.get("CPU", [])
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "backend": backends[0],
        "gpu_offload": gpu,
        "system_info": system.strip(),
        "cpu_features": features,
        "mmap": bool(llama_cpp.llama_supports_mmap()),
    }


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------


class Engine:
    """A loaded text model and its projector. Create sessions from it; close it when done."""

    def __init__(self, opts: LoadOptions, model_info: GGUFInfo, mmproj_info: GGUFInfo) -> None:
        self.opts = opts
        self.model_info = model_info
        self.mmproj_info = mmproj_info
        self.model: Any = None
        self.mctx: Any = None
        self.vocab: Any = None
        self.load_s = 0.0
        self.n_threads = opts.n_threads or default_threads()
        self.embeddings = _EmbeddingCache()

    @classmethod
    def load(cls, opts: LoadOptions) -> Engine:
        model_info = read_gguf(opts.model, "model")
        mmproj_info = read_gguf(opts.mmproj, "mmproj")
        check_pair(model_info, mmproj_info)
        _LOGS.install(opts.verbose)
        engine = cls(opts, model_info, mmproj_info)
        try:
            engine._load()
        except BaseException:
            engine.close()
            raise
        return engine

    def _load(self) -> None:
        start = time.perf_counter()
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = self.opts.gpu_layers if offload else 0
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
        self.model = llama_cpp.llama_model_load_from_file(str(self.opts.model).encode(), mparams)
        if not self.model:
            raise ModelFileError(
                f"llama.cpp could not load model {self.opts.model}: {_LOGS.last_error()}",
                "check that the file is a complete GGUF text model (download it again?)",
            )
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        cparams = mtmd.mtmd_context_params_default()
        cparams.use_gpu = offload and not self.opts.image_on_cpu
        cparams.n_threads = self.n_threads
        cparams.print_timings = self.opts.verbose
        cparams.warmup = False
        cparams.media_marker = MEDIA_MARKER.encode()
        cparams.flash_attn_type = _flash_attn_type(self.opts.flash_attn)
        self.mctx = mtmd.mtmd_init_from_file(str(self.opts.mmproj).encode(), self.model, cparams)
        if not self.mctx:
            raise ModelFileError(
                f"libmtmd could not load mmproj {self.opts.mmproj} for model "
                f"{self.opts.model.name}: {_LOGS.last_error() or 'unknown error'}",
                "use the mmproj published with this model",
            )
        if not mtmd.mtmd_support_vision(self.mctx):
            raise ModelFileError(
                f"mmproj {self.opts.mmproj} has no vision encoder",
                "use the vision projector (mmproj) that belongs to the model",
            )
        self.load_s = time.perf_counter() - start

    @property
    def n_embd(self) -> int:
        return int(llama_cpp.llama_model_n_embd_inp(self.model))

    @property
    def n_ctx_train(self) -> int:
        return int(llama_cpp.llama_model_n_ctx_train(self.model))

    @property
    def chat_template(self) -> str | None:
        return self.model_info.get_str("tokenizer.chat_template")

    def special_text(self, which: str) -> str:
        """The text of the BOS or EOS token ("bos"/"eos"), for chat templates."""
        tok = (llama_cpp.llama_vocab_bos if which == "bos" else llama_cpp.llama_vocab_eos)(
            self.vocab
        )
        if tok < 0:
            return ""
        raw = llama_cpp.llama_vocab_get_text(self.vocab, tok)
        return raw.decode("utf-8", errors="replace") if raw else ""

    @property
    def adds_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))

    def token_piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def tokenize(self, text: bytes, *, add_special: bool) -> list[int]:
        cap = len(text) + 8
        arr = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, text, len(text), arr, cap, add_special, True)
        if n < 0:
            cap = -n
            arr = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, text, len(text), arr, cap, add_special, True)
        return list(arr[:n])

    def new_session(self, n_ctx: int) -> Session:
        return Session(self, n_ctx)

    def close(self) -> None:
        if self.mctx:
            mtmd.mtmd_free(self.mctx)
            self.mctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _flash_attn_type(flag: bool | None) -> int:
    if flag is None:
        return int(llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO)
    return int(
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if flag
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )


class _EmbeddingCache:
    """Image embeddings by (image key, chunk index), least recently used out first."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self.nbytes = 0

    def get(self, key: tuple[str, int]) -> Any:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: tuple[str, int], value: Any) -> None:
        self.items[key] = value
        self.nbytes += ctypes.sizeof(value)
        while self.nbytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.nbytes -= ctypes.sizeof(old)


# ---------------------------------------------------------------------------------------------


@dataclass
class _Span:
    """Something in the KV cache: a tokenized text piece, an image, or generated tokens."""

    kind: str  # "text" | "image" | "gen"
    key: bytes  # text bytes, or the image key
    pos_start: int
    pos_end: int
    tokens: list[int] = field(default_factory=list)
    pieces: list[bytes] = field(default_factory=list)  # gen only: one per token


@dataclass
class _Turn:
    started: float
    prompt_tokens: int = 0
    image_tokens: int = 0
    cached_tokens: int = 0
    image_encode_s: float = 0.0
    prefill_s: float = 0.0


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
        params.flash_attn_type = _flash_attn_type(engine.opts.flash_attn)
        params.no_perf = False
        self.ctx = llama_cpp.llama_init_from_model(engine.model, params)
        if not self.ctx:
            raise EngineError(
                f"llama.cpp could not create a context of {n_ctx} tokens: {_LOGS.last_error()}",
                "try a smaller --ctx",
            )
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = int(llama_cpp.llama_n_batch(self.ctx))  # llama.cpp may lower it
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.spans: list[_Span] = []
        self.image_tokens: dict[str, int] = {}  # image key -> context tokens it takes
        self.counters = Counters()
        self._turn: _Turn | None = None
        self.last: Completion | None = None

    @property
    def n_past(self) -> int:
        return self.spans[-1].pos_end if self.spans else 0

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, prompt: str, images: Sequence[Bitmap], *, add_special: bool) -> None:
        """Bring the KV cache to ``prompt`` (images at MEDIA_MARKER), evaluating only what is new.

        ``add_special``: add the model's BOS token at position 0 (when the rendered prompt does
        not already carry it).
        """
        texts = prompt.split(MEDIA_MARKER)
        if len(texts) != len(images) + 1:
            raise EngineError(f"prompt has {len(texts) - 1} image markers for {len(images)} images")
        parts: list[bytes | Bitmap] = []
        for i, text in enumerate(texts):
            if text:
                parts.append(text.encode("utf-8"))
            if i < len(images):
                parts.append(images[i])
        if not parts or not isinstance(parts[-1], bytes):
            raise EngineError("a prompt must end in text, not an image")
        self._turn = turn = _Turn(started=time.perf_counter())
        keep_pos, remainder = self._match(parts)
        turn.cached_tokens = keep_pos
        if not remainder:
            self._refresh_logits()
        # Tokenize everything first, so a prompt that cannot fit fails before any work.
        planned: list[tuple[bytes, list[int]] | tuple[Bitmap, Any]] = []
        try:
            for i, part in enumerate(remainder):
                if isinstance(part, bytes):
                    first = add_special and keep_pos == 0 and i == 0
                    planned.append((part, self.engine.tokenize(part, add_special=first)))
                else:
                    planned.append((part, self._tokenize_image(part)))
            need = sum(
                len(x) if isinstance(p, bytes) else int(mtmd.mtmd_helper_get_n_pos(x))
                for p, x in planned
            )
            if keep_pos + need > self.n_ctx:
                raise ContextOverflow(
                    f"the prompt needs {keep_pos + need} tokens but the context holds {self.n_ctx}",
                    "raise --ctx, or send fewer or smaller images",
                )
            for i, (part, item) in enumerate(planned):
                if isinstance(part, bytes):
                    self._eval_text(part, item, logits=i == len(planned) - 1)
                else:
                    self._eval_chunks(part.key, item)
        finally:
            for part, item in planned:
                if not isinstance(part, bytes):
                    mtmd.mtmd_input_chunks_free(item)
        turn.prompt_tokens = self.n_past

    def _match(self, parts: Sequence[bytes | Bitmap]) -> tuple[int, list[bytes | Bitmap]]:
        """Trim the cache to the longest prefix it shares with ``parts``; return what is left.

        Text is compared by bytes: a recorded text span is kept when the new text continues it,
        generated tokens one by one, images by key.
        """
        spans = self.spans
        j = keep = 0  # whole spans kept, positions kept
        partial = 0  # tokens kept of spans[j] (generated text that only partly matches)
        rest: list[bytes | Bitmap] = []
        for i, part in enumerate(parts):
            if not isinstance(part, bytes):
                span = spans[j] if j < len(spans) else None
                if span and span.kind == "image" and span.key == part.key.encode():
                    keep = span.pos_end
                    j += 1
                    continue
                rest = list(parts[i:])
                break
            off = 0
            while j < len(spans) and spans[j].kind != "image":
                span = spans[j]
                if span.kind == "text":
                    if not part.startswith(span.key, off):
                        break
                    off += len(span.key)
                    keep = span.pos_end
                    j += 1
                    continue
                n = 0  # generated tokens: keep as many as the new text repeats
                while n < len(span.pieces) and part.startswith(span.pieces[n], off):
                    off += len(span.pieces[n])
                    n += 1
                keep = span.pos_start + n
                if n < len(span.pieces):
                    partial = n
                    break
                j += 1
            if partial or off < len(part) or (j < len(spans) and spans[j].kind != "image"):
                rest = [part[off:]] if off < len(part) else []
                rest += parts[i + 1 :]
                break
        if self._trim(j, keep, partial):
            return keep, rest
        # This cache cannot be cut there (a sliding-window or recurrent model): start over.
        llama_cpp.llama_memory_clear(self.mem, True)
        self.spans.clear()
        return 0, list(parts)

    def _trim(self, keep_spans: int, keep_pos: int, partial: int) -> bool:
        """Forget spans and KV cells after the kept prefix; False if the cache refuses."""
        if partial:
            span = self.spans[keep_spans]
            del span.tokens[partial:], span.pieces[partial:]
            span.pos_end = keep_pos
            keep_spans += 1
        del self.spans[keep_spans:]
        if keep_pos >= self._kv_end():
            return True
        return bool(llama_cpp.llama_memory_seq_rm(self.mem, _SEQ, keep_pos, -1))

    def _kv_end(self) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self.mem, _SEQ)) + 1

    def _refresh_logits(self) -> None:
        """The prompt is all in the cache, but sampling needs its logits: redo its last token."""
        span = self.spans[-1]
        if span.kind == "image":
            raise EngineError("a prompt must end in text, not an image")
        llama_cpp.llama_memory_seq_rm(self.mem, _SEQ, span.pos_end - 1, -1)
        self._decode_tokens(span.tokens[-1:], span.pos_end - 1, logits=True)

    def _record_gen(self, token: int, piece: bytes) -> None:
        last = self.spans[-1] if self.spans else None
        pos = self.n_past
        if last is not None and last.kind == "gen":
            last.tokens.append(token)
            last.pieces.append(piece)
            last.pos_end = pos + 1
        else:
            self.spans.append(_Span("gen", b"", pos, pos + 1, [token], [piece]))

    def _eval_text(self, text: bytes, tokens: list[int], *, logits: bool) -> None:
        if not tokens:
            return
        start, pos = time.perf_counter(), self.n_past
        self._decode_tokens(tokens, pos, logits=logits)
        if self._turn:
            self._turn.prefill_s += time.perf_counter() - start
        self.spans.append(_Span("text", text, pos, pos + len(tokens), tokens))

    def _decode_tokens(self, tokens: list[int], pos: int, *, logits: bool) -> None:
        n_batch = self.n_batch
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start : start + n_batch]
            b = self.batch
            b.n_tokens = len(chunk)
            for k, tok in enumerate(chunk):
                b.token[k] = tok
                b.pos[k] = pos + start + k
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = _SEQ
                b.logits[k] = 0
            is_last = start + n_batch >= len(tokens)
            b.logits[len(chunk) - 1] = 1 if (logits and is_last) else 0
            rc = llama_cpp.llama_decode(self.ctx, b)
            if rc != 0:
                raise EngineError(f"llama_decode failed ({rc}): {_LOGS.last_error()}")
        self.counters.text_tokens_evaluated += len(tokens)

    def _tokenize_image(self, image: Bitmap) -> Any:
        if len(image.rgb) != image.width * image.height * 3:
            raise ImageError(f"image {image.key[:12]} has a wrong pixel buffer size")
        pixels = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
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
                    f"pixels (error {rc}): {_LOGS.last_error()}"
                )
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        return chunks

    def _eval_chunks(self, key: str, chunks: Any) -> None:
        """Evaluate one image's chunks: its wrapper text tokens and its image embeddings."""
        turn = self._turn
        start_pos = self.n_past
        pos = start_pos
        n_embd = self.engine.n_embd
        for idx in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, idx)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                self._decode_tokens([ptr[k] for k in range(n.value)], pos, logits=False)
                pos += n.value
                continue
            n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            embd = self.engine.embeddings.get((key, idx))
            if embd is None:
                t0 = time.perf_counter()
                if mtmd.mtmd_encode_chunk(self.engine.mctx, chunk) != 0:
                    raise EngineError(f"image encoding failed: {_LOGS.last_error()}")
                out = mtmd.mtmd_get_output_embd(self.engine.mctx)
                embd = (ctypes.c_float * (n_tokens * n_embd))()
                ctypes.memmove(embd, out, ctypes.sizeof(embd))
                self.engine.embeddings.put((key, idx), embd)
                self.counters.image_chunks_encoded += 1
                if turn:
                    turn.image_encode_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            new_pos = llama_cpp.llama_pos(0)
            rc = mtmd.mtmd_helper_decode_image_chunk(
                self.engine.mctx,
                self.ctx,
                chunk,
                embd,
                pos,
                _SEQ,
                self.n_batch,
                ctypes.byref(new_pos),
                mtmd.mtmd_helper_post_decode_callback(),
                None,
            )
            if rc != 0:
                raise EngineError(f"decoding image embeddings failed ({rc}): {_LOGS.last_error()}")
            pos = int(new_pos.value)
            self.counters.image_tokens_evaluated += n_tokens
            if turn:
                turn.prefill_s += time.perf_counter() - t0
                turn.image_tokens += n_tokens
        self.spans.append(_Span("image", key.encode(), start_pos, pos))
        self.image_tokens[key] = pos - start_pos

    # -- generation ---------------------------------------------------------------------------

    def generate(self, params: SamplingParams) -> Iterator[str]:
        """Stream the answer to the evaluated prompt. ``self.last`` holds the result after."""
        turn = self._turn or _Turn(started=time.perf_counter())
        self._turn = None
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        sampler = _build_sampler(
            params, seed, int(llama_cpp.llama_vocab_n_tokens(self.engine.vocab))
        )
        stream = TextStream(params.stop)
        limit = params.max_tokens if params.max_tokens is not None else self.n_ctx
        n_gen = 0
        finish = "length"
        first_at = 0.0
        try:
            while n_gen < limit:
                token = llama_cpp.llama_sampler_sample(sampler, self.ctx, -1)
                if n_gen == 0:
                    first_at = time.perf_counter()
                if llama_cpp.llama_vocab_is_eog(self.engine.vocab, token):
                    finish = "stop"
                    break
                n_gen += 1
                self.counters.tokens_generated += 1
                piece = self.engine.token_piece(token)
                text = stream.feed(piece)
                if text:
                    yield text
                if stream.stopped:
                    finish = "stop"
                    break
                if n_gen >= limit or self.n_past >= self.n_ctx:
                    break
                self._decode_tokens([token], self.n_past, logits=True)
                self._record_gen(token, piece)
            tail = stream.finish()
            if tail:
                yield tail
        finally:
            llama_cpp.llama_sampler_free(sampler)
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
                decode_tokens_per_s=(n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else 0.0,
            ),
        )

    def perf(self) -> dict[str, float]:
        """llama.cpp's own counters for this context (for benchmarks)."""
        data = llama_cpp.llama_perf_context(self.ctx)
        return {
            "prompt_eval_ms": data.t_p_eval_ms,
            "prompt_tokens": data.n_p_eval,
            "eval_ms": data.t_eval_ms,
            "eval_tokens": data.n_eval,
        }


def _build_sampler(params: SamplingParams, seed: int, n_vocab: int) -> Any:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if params.repeat_penalty != 1.0 and params.repeat_last_n != 0:
        add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0
            ),
        )
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

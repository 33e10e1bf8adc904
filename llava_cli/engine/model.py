"""A loaded text model and its libmtmd projector, checked before llama.cpp sees them."""

from __future__ import annotations

import ctypes
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

from ..digests import is_sha256
from ..errors import EngineError, ModelFileError
from ..gguf_checks import check_tokenizer
from ..gguf_file import GGUFInfo, LongString, check_pair, read_gguf
from ..templates import MEDIA_MARKER
from ..units import human_bytes
from .native import (
    INTERRUPTS,
    LOGS,
    default_threads,
    init,
    local_gpu,
    max_devices,
    system_info,
)
from .rpc import add_servers, buffer_devices, keep_alive


@dataclass(frozen=True)
class LoadOptions:
    model: Path
    mmproj: Path
    n_threads: int = 0  # 0: one per available CPU
    n_batch: int = 512
    gpu_layers: int = -1  # -1: all layers, where the build supports offload
    image_on_cpu: bool = False
    flash_attn: bool | None = None  # None: let llama.cpp decide
    repack: bool | None = None  # None: repack_default() for this build
    rpc: tuple[str, ...] = ()  # RPC servers (HOST:PORT) whose devices take layers
    tensor_split: tuple[float, ...] = ()  # the layers' shares over the devices; () by memory
    verbose: bool = False


def repack_default(info: str) -> bool:
    """Whether to repack quantized weights for the CPU's matrix kernels (llama.cpp's
    ``use_extra_bufts``), by the build's features (``system_info()``). Measured side by side
    with llama-bench on one machine's AVX2 and AVX-512 builds (README, Performance): on AVX2
    repacking speeds up the prompt; on AVX-512 ggml's own kernels beat the repacked ones and
    repacking costs a quarter more memory. On Arm the repacked Q4_0/IQ4_NL kernels are what
    llama.cpp recommends."""
    return "AVX512 = 1" not in info


def flash_attn_type(flag: bool | None) -> int:
    if flag is None:
        return int(llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO)
    return int(
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if flag
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )


def file_identity(path: Path) -> str:
    """Names a file's content cheaply: a hub blob's own sha256, else its size, mtime and the
    bytes at both ends (a changed or replaced file gets another identity)."""
    real = path.resolve()
    if is_sha256(real.name):
        return real.name
    digest = hashlib.sha256()
    stat = real.stat()
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with real.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, stat.st_size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()


class Engine:
    """The weights: a text model and its projector. ``Session(engine, n_ctx)`` makes a KV cache
    over them; close the engine when done."""

    def __init__(self, opts: LoadOptions, model_info: GGUFInfo) -> None:
        self.opts = opts
        self.model_info = model_info
        self.model: Any = None
        self.mctx: Any = None
        self.vocab: Any = None
        self.load_s = 0.0
        self.n_threads = opts.n_threads or default_threads()
        self.repack = repack_default(system_info()) if opts.repack is None else opts.repack
        self.embeddings = EmbeddingCache()
        self.devices: list[dict[str, Any]] = []  # where the text model's layers and bytes are
        self._split: Any = None  # --tensor-split's C array, alive while llama.cpp may read it

    @classmethod
    def load(cls, opts: LoadOptions) -> Engine:
        model_info = read_gguf(opts.model, "model")
        mmproj_info = read_gguf(opts.mmproj, "mmproj")
        check_pair(model_info, mmproj_info)
        init(opts.verbose)
        if opts.rpc:  # before any weight is read: a server that is not there fails here
            add_servers(opts.rpc)
        engine = cls(opts, model_info)
        try:
            with INTERRUPTS.native():
                engine._load()
        except BaseException:
            engine.close()
            raise
        return engine

    @classmethod
    def load_vocab(cls, opts: LoadOptions) -> Engine:
        """Only the tokenizer and metadata (milliseconds): enough to render prompts."""
        model_info = read_gguf(opts.model, "model")
        check_tokenizer(model_info)  # what llama.cpp's vocabulary loader would abort on
        init(opts.verbose)
        engine = cls(opts, model_info)
        mparams = llama_cpp.llama_model_default_params()
        mparams.vocab_only = True
        engine.model = llama_cpp.llama_model_load_from_file(str(opts.model).encode(), mparams)
        if not engine.model:
            raise ModelFileError(
                f"llama.cpp could not read the tokenizer of {opts.model}: {LOGS.last_error()}",
                "check that the file is a complete GGUF text model (download it again?)",
            )
        engine.vocab = llama_cpp.llama_model_get_vocab(engine.model)
        return engine

    def identity(self) -> str:
        """What a saved KV state depends on: both files, the build, and how images run."""
        system = system_info()
        parts = [
            file_identity(self.opts.model),
            file_identity(self.opts.mmproj),
            llama_cpp.__version__,
            system,  # backends and CPU features the build uses
            f"gpu_offload={self.offload}",
            f"gpu_layers={self.opts.gpu_layers}",
            f"flash_attn={self.opts.flash_attn}",
            f"n_batch={self.opts.n_batch}",
            f"image_on_cpu={self.opts.image_on_cpu}",
            f"repack={self.repack}",  # repacked kernels round differently
            f"rpc={','.join(self.opts.rpc)}",  # other machines' devices compute other layers
            f"tensor_split={self.opts.tensor_split}",
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _load(self) -> None:
        start = time.perf_counter()
        offload = self.offload
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = self.opts.gpu_layers if offload else 0
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
        mparams.use_extra_bufts = self.repack
        if self.opts.tensor_split:
            shares = self.opts.tensor_split
            self._split = (ctypes.c_float * max_devices())(*shares)
            mparams.tensor_split = self._split
        mparams.progress_callback = INTERRUPTS.progress_callback
        LOGS.placement = []
        try:
            self.model = llama_cpp.llama_model_load_from_file(
                str(self.opts.model).encode(), mparams
            )
            self.devices = placement(LOGS.placement, buffer_devices() if self.opts.rpc else None)
        finally:
            LOGS.placement = None
        if self.opts.rpc:
            for endpoint in self.opts.rpc:  # its connection now lives as long as the model
                keep_alive(endpoint)
            LOGS.note("layers: " + "; ".join(_shown(d) for d in self.devices))
        if not self.model:
            INTERRUPTS.check()  # a Ctrl-C aborts loading through the progress callback
            raise ModelFileError(
                f"llama.cpp could not load model {self.opts.model}: {LOGS.last_error()}",
                "check that the file is a complete GGUF text model (download it again?)",
            )
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        cparams = mtmd.mtmd_context_params_default()
        # the image encoder runs here: on a local GPU if there is one, never on an RPC server
        cparams.use_gpu = offload and not self.opts.image_on_cpu and local_gpu()
        cparams.n_threads = self.n_threads
        cparams.print_timings = self.opts.verbose
        cparams.warmup = False
        cparams.media_marker = MEDIA_MARKER.encode()
        cparams.flash_attn_type = flash_attn_type(self.opts.flash_attn)
        self.mctx = mtmd.mtmd_init_from_file(str(self.opts.mmproj).encode(), self.model, cparams)
        if not self.mctx:
            raise ModelFileError(
                f"libmtmd could not load mmproj {self.opts.mmproj} for model "
                f"{self.opts.model.name}: {LOGS.last_error() or 'unknown error'}",
                "use the mmproj published with this model",
            )
        if not mtmd.mtmd_support_vision(self.mctx):
            raise ModelFileError(
                f"mmproj {self.opts.mmproj} has no vision encoder",
                "use the vision projector (mmproj) that belongs to the model",
            )
        self.load_s = time.perf_counter() - start

    @property
    def offload(self) -> bool:
        """Whether layers can leave the CPU: a GPU here, or RPC servers' devices. (llama.cpp's
        llama_supports_gpu_offload says yes for any build with the RPC backend.)"""
        return local_gpu() or bool(self.opts.rpc)

    @property
    def n_embd(self) -> int:
        return int(llama_cpp.llama_model_n_embd_inp(self.model))

    @property
    def n_ctx_train(self) -> int:
        return int(llama_cpp.llama_model_n_ctx_train(self.model))

    @property
    def n_vocab(self) -> int:
        return int(llama_cpp.llama_vocab_n_tokens(self.vocab))

    @property
    def chat_template(self) -> str | None:
        value = self.model_info.metadata.get("tokenizer.chat_template")
        if isinstance(value, LongString):  # never silently another format
            raise ModelFileError(
                f"{self.opts.model}: its chat template is {value.length:,} bytes, longer than "
                "any real template",
                "--chat-format NAME picks another format",
            )
        return value if isinstance(value, str) else None

    @property
    def bos_token(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self.vocab))

    def special_text(self, which: str) -> str:
        """The text of the BOS or EOS token ("bos"/"eos"), for chat templates."""
        vocab_fn = llama_cpp.llama_vocab_bos if which == "bos" else llama_cpp.llama_vocab_eos
        tok = vocab_fn(self.vocab)
        if tok < 0:
            return ""
        raw = llama_cpp.llama_vocab_get_text(self.vocab, tok)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        """A token's bytes; control tokens are empty unless ``special``."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def special_tokens_in(self, texts: Sequence[str]) -> frozenset[int]:
        """The special tokens these texts contain (Gemma 4's ``<|channel>``), which generation
        otherwise writes as nothing: a thinking model's delimiters must stay visible."""
        ids = set()
        for text in texts:
            for token in self.tokenize(text, add_special=False):
                if not self.token_piece(token) and self.token_piece(token, special=True):
                    ids.add(token)
        return frozenset(ids)

    def count_tokens_up_to(self, text: str, limit: int, piece: int = 4096) -> int:
        """Tokens in ``text``, counted a piece at a time and only until there are more than
        ``limit``: each piece costs what a short text costs, however the tokenizer scales.
        Pieces end after whitespace where there is some; merges across a piece's edge can
        save one token each, so the pieces' edges are taken off the count."""
        total = 0
        start = 0
        while start < len(text) and total <= limit:
            end = min(len(text), start + piece)
            if end < len(text):
                space = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
                end = space + 1 if space > start else end
            total += len(self.tokenize(text[start:end], add_special=False)) - 1
            start = end
        return total

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Text to tokens; special-token text (``</s>``, ``<|im_end|>``) becomes those tokens."""
        raw = text.encode("utf-8", errors="replace")
        cap = len(raw) + 8
        arr = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), arr, cap, add_special, True)
        if n < 0:
            cap = -n
            arr = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), arr, cap, add_special, True)
        return list(arr[:n])

    def check_context_fits(self, n_ctx: int) -> None:
        """Refuse a context whose KV cache cannot fit in the memory left, before llama.cpp
        allocates it (on the CPU the allocation succeeds and the OOM killer strikes later).
        Offloaded layers keep their cache on the GPU, whose allocator fails cleanly."""
        from ..memory import available_bytes, context_bytes_at_least

        if self.opts.gpu_layers != 0 and self.offload:
            return
        need = context_bytes_at_least(self.model_info, n_ctx, self.opts.n_batch)
        free = available_bytes()
        if free is None or need <= free:
            return
        per_token = max(1, context_bytes_at_least(self.model_info, 1, self.opts.n_batch))
        raise EngineError(
            f"a context of {n_ctx:,} tokens needs at least {human_bytes(need)} (KV cache and "
            f"attention buffers), and {human_bytes(free)} of memory is available",
            f"use a smaller --ctx (about {free // per_token // 2:,} tokens fit with room to work)",
        )

    def close(self) -> None:
        if self.mctx:
            mtmd.mtmd_free(self.mctx)
            self.mctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


class EmbeddingCache:
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


_LAYER = re.compile(r"layer\s+\d+ assigned to device (\S+?),")
_BUFFER = re.compile(r"(\S+) model buffer size =\s+([\d.]+) MiB")


def placement(lines: Sequence[str], buffers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Each device's share of the text model, from llama.cpp's load log: its layers and its
    weights' bytes. ``buffers`` names the device of a buffer where its name does not: an RPC
    buffer is ``RPC<i>[host:port]``, the i-th device of that server, whatever ggml calls the
    device; the CPU's are ``CPU_Mapped``, ``CPU_REPACK``."""
    buffers = buffers or {}
    found: dict[str, dict[str, Any]] = {}

    def device(name: str) -> dict[str, Any]:
        return found.setdefault(name, {"device": name, "layers": 0, "bytes": 0})

    for line in lines:
        if layer := _LAYER.search(line):
            device(layer.group(1))["layers"] += 1
        elif buffer := _BUFFER.search(line):
            name = buffers.get(buffer.group(1)) or buffer.group(1).split("[", 1)[0]
            name = "CPU" if name.startswith("CPU") else name
            device(name)["bytes"] += round(float(buffer.group(2)) * (1 << 20))
    return list(found.values())


def _shown(device: dict[str, Any]) -> str:
    return f"{device['device']} {device['layers']} layers, {human_bytes(device['bytes'])}"


def quantize(source: Path, target: Path, ftype: str) -> None:
    """Write ``source`` quantized as llama.cpp's ``LLAMA_FTYPE_MOSTLY_<ftype>`` ("Q4_K_M",
    "Q4_0"): the benchmark's pair and the tests' repacked model."""
    init(verbose=False)  # llama.cpp's logs stay quiet
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = default_threads()
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if rc != 0:
        raise EngineError(f"llama.cpp could not quantize {source} to {ftype} (error {rc})")

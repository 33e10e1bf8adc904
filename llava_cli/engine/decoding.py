"""Putting tokens and images into a llama context: a reused token batch, and libmtmd's image
chunks (preprocessed, encoded, decoded). What the cache then holds is the Session's to record."""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

from ..errors import EngineError, ImageError
from ..templates import MEDIA_MARKER
from .native import INTERRUPTS, LOGS
from .records import Bitmap


class TokenBatch:
    """One llama_batch, reused for every decode into ``ctx``'s sequence ``seq``."""

    def __init__(self, ctx: Any, n_batch: int, seq: int) -> None:
        self.ctx, self.n_batch, self.seq = ctx, n_batch, seq
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def decode(self, tokens: list[int], pos: int, *, logits: bool) -> None:
        """Decode ``tokens`` from position ``pos`` on, ``n_batch`` at a time; ``logits``: keep
        the last token's logits for sampling."""
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset : offset + self.n_batch]
            b = self.batch
            b.n_tokens = len(chunk)
            for k, tok in enumerate(chunk):
                b.token[k] = tok
                b.pos[k] = pos + offset + k
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = self.seq
                b.logits[k] = 0
            b.logits[len(chunk) - 1] = int(logits and offset + self.n_batch >= len(tokens))
            rc = llama_cpp.llama_decode(self.ctx, b)
            if rc != 0:
                INTERRUPTS.check()  # an abort from Ctrl-C
                raise EngineError(f"llama_decode failed ({rc}): {LOGS.last_error()}")

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.batch)


def image_chunks(mctx: Any, image: Bitmap) -> Any:
    """libmtmd's chunks for one image: its wrapper text tokens and its image tokens. The caller
    frees them (``mtmd_input_chunks_free``)."""
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
        rc = mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1)
        if rc != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise ImageError(
                f"libmtmd could not preprocess an image of {image.width}x{image.height} "
                f"pixels (error {rc}): {LOGS.last_error()}"
            )
    finally:
        mtmd.mtmd_bitmap_free(bitmap)
    return chunks


def chunk_text_tokens(chunk: Any) -> list[int] | None:
    """The tokens of a text chunk (the text around an image); None for an image chunk."""
    if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
        return None
    n = ctypes.c_size_t()
    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return [ptr[k] for k in range(n.value)]


def encode_image_chunk(mctx: Any, chunk: Any, n_tokens: int, n_embd: int) -> Any:
    """Run the vision encoder on an image chunk; its embeddings, copied out of libmtmd."""
    if mtmd.mtmd_encode_chunk(mctx, chunk) != 0:
        raise EngineError(f"image encoding failed: {LOGS.last_error()}")
    INTERRUPTS.check()
    embd = (ctypes.c_float * (n_tokens * n_embd))()
    ctypes.memmove(embd, mtmd.mtmd_get_output_embd(mctx), ctypes.sizeof(embd))
    return embd


def decode_image_chunk(
    mctx: Any, ctx: Any, chunk: Any, embd: Any, pos: int, seq: int, n_batch: int
) -> int:
    """Decode an image chunk's embeddings from position ``pos`` on; the next position."""
    new_pos = llama_cpp.llama_pos(0)
    rc = mtmd.mtmd_helper_decode_image_chunk(
        mctx, ctx, chunk, embd, pos, seq, n_batch,
        ctypes.byref(new_pos), mtmd.mtmd_helper_post_decode_callback(), None,
    )  # fmt: skip
    if rc != 0:
        INTERRUPTS.check()
        raise EngineError(f"decoding image embeddings failed ({rc}): {LOGS.last_error()}")
    return int(new_pos.value)

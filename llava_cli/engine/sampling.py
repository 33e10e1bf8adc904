"""Picking an answer's tokens: the sampler chain ``SamplingParams`` ask for, and a grammar
applied before it.

The grammar is applied first at every step, as llama.cpp's common sampler does when it
resamples: it sets every token it does not allow to -inf, end-of-generation included until the
grammar is complete; then the usual chain (penalties, top-k, top-p, min-p, temperature, the
draw) picks among what is left. Each answer gets a fresh grammar state; nothing of it lives in
the KV cache, so the prefix cache, ``/retry`` and repeated asks need nothing more.

Two things llama.cpp does not guard against are guarded here. A token the grammar rejects, once
accepted, throws a C++ exception that aborts the process; so sampling is done step by step
(apply the grammar, check that something is left, apply the chain, accept) instead of by
``llama_sampler_sample``. And the grammar sees a control token as its text (``<s>``), while the
answer shows nothing for it, and its UTF-8 decoder takes byte sequences (overlong forms,
surrogates) that the answer's decoder shows as U+FFFD: such tokens are masked under a grammar,
so that the text the grammar checked is the text the answer holds.
"""

from __future__ import annotations

import codecs
import ctypes
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llama_cpp

from ..errors import BadInput, EngineError
from ..gbnf import GrammarError
from ..options import SamplingParams
from .grammar import check_grammar, init_grammar_sampler
from .model import Engine

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


def build_sampler_chain(params: SamplingParams, seed: int, n_vocab: int) -> Any:
    """Penalties, then greedy (temperature 0) or top-k, top-p, min-p, temperature and a draw
    seeded with ``seed``; the caller frees the chain (``TokenPicker.close``)."""
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


# After a lone lead byte, the second byte of a valid UTF-8 sequence lies in a narrower range
# than 80-BF: llama.cpp's grammar decoder accepts overlong forms, surrogates and code points
# past U+10FFFF, which the answer's text decoder then shows as U+FFFD.
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


@dataclass(frozen=True)
class _VocabFacts:
    never: npt.NDArray[np.intp]  # tokens never allowed under a grammar
    first_byte: npt.NDArray[np.int16]  # each token's first byte (-1: none)


_FACTS: weakref.WeakKeyDictionary[Engine, _VocabFacts] = weakref.WeakKeyDictionary()


def _vocab_facts(engine: Engine) -> _VocabFacts:
    """What the grammar cannot judge about each token (computed once per model): control and
    unknown tokens that do not end generation (the grammar reads them as their text, the
    answer shows nothing), and tokens whose bytes are not UTF-8 (beyond a sequence cut at
    either end, which the grammar follows across tokens)."""
    import numpy as np

    facts = _FACTS.get(engine)
    if facts is not None:
        return facts
    special = llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN | llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    vocab = engine.vocab
    never: list[int] = []
    first = np.full(engine.n_vocab, -1, dtype=np.int16)
    for token in range(engine.n_vocab):
        if llama_cpp.llama_vocab_get_attr(vocab, token) & special:
            if not llama_cpp.llama_vocab_is_eog(vocab, token):
                never.append(token)
            continue
        piece = engine.token_piece(token, special=True)
        if not piece:
            continue
        first[token] = piece[0]
        if not piece.isascii() and not _utf8_but_cut(piece):
            never.append(token)
    facts = _FACTS[engine] = _VocabFacts(np.array(never, dtype=np.intp), first)
    return facts


def _utf8_but_cut(piece: bytes) -> bool:
    """UTF-8, but for continuation bytes it may start with and a sequence it may end inside."""
    start = 0
    while start < len(piece) and 0x80 <= piece[start] < 0xC0 and start < 3:
        start += 1
    try:
        codecs.getincrementaldecoder("utf-8")().decode(piece[start:], final=False)
    except UnicodeDecodeError:
        return False
    return True


def _incomplete_tail(data: bytes) -> bytes:
    """The bytes of a UTF-8 sequence ``data`` ends inside (empty if it ends a character)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return b""
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data[-back:] if back < need else b""
    return b""


class TokenPicker:
    """Picks each token of one answer: with ``chain`` alone, or under ``grammar`` (GBNF) first.
    Owns the chain and frees it (and the grammar) in ``close``."""

    def __init__(
        self, engine: Engine, chain: Any, grammar: str | None, shown: frozenset[int]
    ) -> None:
        self.chain = chain
        self.grammar: Any = None
        if grammar is None:
            return

        try:
            check_grammar(grammar)
            self.grammar = init_grammar_sampler(engine.vocab, grammar)
        except BaseException as exc:
            llama_cpp.llama_sampler_free(chain)
            if isinstance(exc, GrammarError):
                raise BadInput(f"the grammar cannot be used with this model: {exc}") from None
            raise
        try:
            self._prepare(engine, shown)
        except BaseException:  # numpy, the vocabulary scan: the samplers are freed all the same
            self.close()
            raise

    def _prepare(self, engine: Engine, shown: frozenset[int]) -> None:
        """The candidate array and the token masks a grammar-held answer samples with."""
        import numpy as np

        n = engine.n_vocab
        self.engine = engine
        self.ids = np.arange(n, dtype=np.int32)
        facts = _vocab_facts(engine)
        shown_ids = np.array(sorted(shown), dtype=np.intp)
        self.never = np.setdiff1d(facts.never, shown_ids)
        self.first_byte = facts.first_byte
        self.tail = b""  # the answer's bytes of a character not yet complete
        self.candidates = np.zeros(
            n, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)]
        )  # llama_token_data's layout
        self.pointer = self.candidates.ctypes.data_as(llama_cpp.llama_token_data_p)
        self.array = llama_cpp.llama_token_data_array(
            data=self.pointer, size=n, selected=-1, sorted=False
        )

    def sample(self, ctx: Any) -> int:
        if self.grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.chain, ctx, -1))
        import numpy as np

        n = len(self.ids)
        row = llama_cpp.llama_get_logits_ith(ctx, -1)
        if not row:
            raise EngineError("llama.cpp has no logits to sample from")
        cand = self.candidates
        cand["id"] = self.ids
        cand["logit"] = np.ctypeslib.as_array(row, shape=(n,))
        cand["p"] = 0.0
        logit = cand["logit"]
        logit[self.never] = -np.inf
        if len(self.tail) == 1 and self.tail[0] in _SECOND_BYTE:
            low, high = _SECOND_BYTE[self.tail[0]]
            first = self.first_byte
            logit[(first >= 0x80) & (first < 0xC0) & ((first < low) | (first > high))] = -np.inf
        arr = self.array
        arr.size, arr.selected, arr.sorted = n, -1, False  # the samplers only shrink the size
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        allowed = np.isfinite(logit)  # in token order: the grammar only masks
        if not allowed.any():
            raise EngineError(
                "the grammar allows no token this model has at this point of the answer",
                "check that the grammar's characters can be written with this model",
            )
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise EngineError("llama.cpp's sampler chose no token")
        token = int(arr.data[arr.selected].id)
        if not allowed[token]:  # would throw inside llama.cpp, and abort
            raise EngineError("llama.cpp's sampler chose a token the grammar does not allow")
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain, token)
        self.tail = _incomplete_tail(self.tail + self.engine.token_piece(token, special=True))
        return token

    def close(self) -> None:
        if self.grammar is not None:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None

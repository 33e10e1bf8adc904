"""Prefix matching over what a KV cache holds, in plain Python (no llama.cpp), testable alone.

The cache is recorded as spans (text tokens, generated tokens, images) with their positions. A
prompt, tokenized, is a list of items: runs of token ids, and images. The cache is kept up to
the first item that differs from the new prompt, and only the items after it are evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from ..errors import EngineError
from ..templates import MEDIA_MARKER
from .records import Bitmap

PromptItem = list[int] | Bitmap  # a prompt, tokenized: runs of text tokens, and images


@dataclass
class Span:
    """A stretch of the cache: text tokens, generated ("gen") tokens, or one image."""

    kind: str  # "text" | "gen" | "image"
    pos_start: int
    pos_end: int
    tokens: list[int] = field(default_factory=list)  # text and gen: one position each
    key: str = ""  # image: its key
    image_cells: int = 0  # image: KV cells (M-RoPE images take fewer positions than cells)

    @property
    def cells(self) -> int:
        return self.image_cells if self.kind == "image" else len(self.tokens)


class Vocabulary(Protocol):
    """What prompt tokenizing needs of a model (``Engine`` is one)."""

    @property
    def bos_token(self) -> int: ...
    def tokenize(self, text: str, *, add_special: bool) -> list[int]: ...
    def token_piece(self, token: int, *, special: bool = False) -> bytes: ...


@dataclass(frozen=True)
class EvaluatedPrompt:
    """The last prompt a session evaluated, as it was given."""

    text: str
    image_keys: list[str]
    add_special: bool


class FirstDifference(NamedTuple):
    """Where the cache stops matching a prompt: keep ``keep_spans`` whole spans plus the first
    ``keep_tokens`` tokens of the next one, then evaluate ``rest``."""

    keep_spans: int
    keep_tokens: int
    rest: list[PromptItem]


def tokenize_prompt(
    prompt: str, images: Sequence[Bitmap], vocab: Vocabulary, *, add_special: bool
) -> list[PromptItem]:
    """``prompt`` as items, each MEDIA_MARKER replaced by its image; BOS (``add_special``) is
    added to the first text, or stands alone when the prompt starts with an image."""
    texts = prompt.split(MEDIA_MARKER)
    if len(texts) != len(images) + 1:
        raise EngineError(f"prompt has {len(texts) - 1} image markers for {len(images)} images")
    items: list[PromptItem] = []
    for i, text in enumerate(texts):
        if text:
            first = add_special and not items
            if tokens := vocab.tokenize(text, add_special=first):
                items.append(tokens)
        elif add_special and not items and vocab.bos_token >= 0:
            items.append([vocab.bos_token])
        if i < len(images):
            items.append(images[i])
    if not items or not isinstance(items[-1], list):
        raise EngineError("a prompt must end in text, not an image")
    return items


def item_ids_and_keys(items: Sequence[PromptItem]) -> list[int | str]:
    """Items as ``span_ids_and_keys`` lists spans: token ids, and image keys for images."""
    out: list[int | str] = []
    for item in items:
        out += item if isinstance(item, list) else [item.key]
    return out


def span_ids_and_keys(spans: Sequence[Span]) -> list[int | str]:
    """What these spans hold: token ids, and image keys for images."""
    out: list[int | str] = []
    for span in spans:
        out += [span.key] if span.kind == "image" else span.tokens
    return out


def join_token_runs(parts: Sequence[PromptItem]) -> list[PromptItem]:
    """Join neighbouring token lists: ``first_difference`` expects one run between images."""
    items: list[PromptItem] = []
    for part in parts:
        if isinstance(part, list) and items and isinstance(items[-1], list):
            items[-1] = [*items[-1], *part]
        else:
            items.append(list(part) if isinstance(part, list) else part)
    return items


def items_held_by(spans: Sequence[Span], images: Sequence[Bitmap]) -> list[PromptItem]:
    """What these spans hold, as prompt items (``images`` in the order the spans hold them)."""
    pictures = iter(images)
    return join_token_runs([next(pictures) if s.kind == "image" else s.tokens for s in spans])


def prefix_through_last_image(items: Sequence[PromptItem]) -> list[int | str] | None:
    """Token ids and image keys up to the prompt's last image (what a saved state holds);
    None for a prompt without an image."""
    last = max((i for i, item in enumerate(items) if not isinstance(item, list)), default=-1)
    return item_ids_and_keys(items[: last + 1]) if last >= 0 else None


def first_difference(spans: Sequence[Span], items: Sequence[PromptItem]) -> FirstDifference:
    """Walk the cache and the prompt together to their first difference: the cache is cut there
    (inside a span if need be) and the prompt's items from there on are evaluated.

    ``items`` must hold one run of tokens between images (``join_token_runs``): a run is matched
    token by token across text and generated spans, an image only whole, by its key.
    """
    j = t = 0  # the first span (and token within it) that does not match yet
    for idx, item in enumerate(items):
        if not isinstance(item, list):
            span = spans[j] if j < len(spans) else None
            if span is None or span.kind != "image" or span.key != item.key:
                return FirstDifference(j, t, list(items[idx:]))
            j += 1
            continue
        k = 0
        while k < len(item) and j < len(spans) and spans[j].kind != "image":
            if spans[j].tokens[t] != item[k]:
                break
            k, t = k + 1, t + 1
            if t == len(spans[j].tokens):
                j, t = j + 1, 0
        if k < len(item):
            return FirstDifference(j, t, [item[k:], *items[idx + 1 :]])
    return FirstDifference(j, t, [])


def reuse_answer_tokens(
    last: EvaluatedPrompt | None,
    spans: Sequence[Span],
    prompt: str,
    images: Sequence[Bitmap],
    vocab: Vocabulary,
    shown_tokens: frozenset[int],
    *,
    add_special: bool,
) -> list[PromptItem] | None:
    """``prompt`` as the cache (``spans``) already holds it, when it goes on from the ``last``
    prompt and its answer: the answer keeps the tokens that were generated, however a fresh
    tokenizer would split the same text, so a follow-up evaluates only its own tokens. None when
    the prompt does not go on from there (tokenize it afresh)."""
    if last is None or not spans:
        return None
    n_old = len(last.image_keys)
    if add_special != last.add_special or not prompt.startswith(last.text):
        return None
    if [image.key for image in images[:n_old]] != last.image_keys:
        return None
    answered = spans[-1].kind == "gen"
    if prompt == last.text:  # the same prompt again (a retry): exactly what the cache holds
        return items_held_by(spans[:-1] if answered else spans, images)
    if not answered:
        return None
    tail = prompt[len(last.text) :].encode("utf-8", "replace")
    kept, used = _tokens_spelling_the_start(spans[-1].tokens, tail, vocab, shown_tokens)
    try:
        rest = tail[used:].decode("utf-8")
    except UnicodeDecodeError:  # the answer's text stops inside a character
        return None
    if not kept or not rest:
        return None
    return join_token_runs(
        [
            *items_held_by(spans[:-1], images[:n_old]),
            kept,
            *tokenize_prompt(rest, images[n_old:], vocab, add_special=False),
        ]
    )


def _tokens_spelling_the_start(
    tokens: Sequence[int], text: bytes, vocab: Vocabulary, shown_tokens: frozenset[int]
) -> tuple[list[int], int]:
    """The leading ``tokens`` whose pieces, one after another, spell the start of ``text``,
    and the bytes they spell (a piece that writes nothing ends them: it shows no text)."""
    used = 0
    kept: list[int] = []
    for token in tokens:
        piece = vocab.token_piece(token, special=token in shown_tokens)
        if not piece or not text.startswith(piece, used):
            break
        used += len(piece)
        kept.append(token)
    return kept, used

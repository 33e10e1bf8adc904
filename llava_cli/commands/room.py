"""Making room in a full context: which earlier exchanges a conversation drops, and when.

When the next turn (and room to answer it) does not fit, a large part of the history goes at
once, not just enough for this turn: the Session keeps its KV cache only up to the first
difference, so every drop re-reads what follows the first dropped exchange. Dropping one
exchange per turn re-read the whole conversation every turn.

How much goes: llama.cpp's own context shift discards half of what can go, but it moves the
cache instead of re-reading it. Here a drop re-reads what it keeps, so keeping a fraction
``k`` of the free room costs, spread over the turns until the next drop, ``k / (1 - k)`` of a
turn's own tokens per turn: half would double every turn's prompt work, a quarter
(KEPT_SHARE) adds a third, and still leaves the recent exchanges for the model to read.

What stays, in order of precedence: the system prompt and the new turn (never dropped), then
the exchanges that carry images (what the conversation is about), then the newest text
exchanges. Text goes first, oldest first, until the history left takes at most KEPT_SHARE of
the context that is free beyond the system prompt, the kept images, the new turn and the room
to answer. Images go only when they must, that is when the image exchanges alone leave no
room for the turn; then all the text goes and the oldest image exchanges go by the same rule,
so a chat with a new image every turn does not drop one each turn. Keeping the image
exchanges also keeps the cache valid through them when they come first, as they usually do:
only the text after them is read again.

Every search counts kept exchanges up from the newest, doubling then bisecting, so each
measurement renders only about what fits: a loaded chat of 200,000 turns costs as little as
one of 200. Used by ``llava chat`` and by ``benchmarks/long_chat.py``: nothing here reads the
terminal or prints (the notice is a string the caller shows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ContextOverflow
from ..options import MAX_TOKEN_CHARS
from ..units import plural

if TYPE_CHECKING:
    from ..conversation import Conversation, Exchange
    from ..images import PreparedImage

ANSWER_ROOM = 256  # tokens kept free for the answer when the conversation must be shortened
KEPT_SHARE = 4  # a drop keeps at most 1/KEPT_SHARE of the free room (see above)


def answer_room(max_tokens: int | None, n_ctx: int) -> int:
    """Tokens kept free to answer: max-tokens (or ANSWER_ROOM), at most a quarter of the
    context."""
    return min(max_tokens or ANSWER_ROOM, n_ctx // 4)


@dataclass(frozen=True)
class Dropped:
    """What making room took out of the conversation."""

    exchanges: int  # user turns dropped, each with its answer
    images: int  # images that went with them
    oldest_only: bool  # the dropped exchanges were the oldest ones, none kept before them
    kept_with_images: int  # image exchanges kept that are older than a dropped one
    need: int | None  # tokens the turn needed with the whole conversation (None: too long)
    n_ctx: int

    def notice(self) -> str:
        """One line for stderr, naming what was dropped."""
        needs = (
            f"needs {self.need} of {self.n_ctx} tokens"
            if self.need
            else f"does not fit {self.n_ctx} tokens"
        )
        n = self.exchanges
        if not self.oldest_only:
            what = plural(n, "earlier message")
        else:
            what = "the oldest message" if n == 1 else f"the {n} oldest messages"
        if self.images:
            what += f" and {plural(self.images, 'image')}"
        if self.kept_with_images:
            k = self.kept_with_images
            what += f"; the {k} with {'an image stays' if k == 1 else 'images stay'}"
        return f"context: this turn {needs} plus room to answer; dropping {what}"


def make_room(
    conversation: Conversation,
    prompt: str,
    images: Sequence[PreparedImage],
    *,
    answer_room: int,
) -> Dropped | None:
    """Shorten ``conversation`` if its next turn (``prompt`` with ``images``) and
    ``answer_room`` tokens would not fit; what was dropped, or None if nothing was.

    Raises ContextOverflow, dropping nothing, when the turn cannot fit even alone. The
    conversation is changed in place (measuring renders candidate histories): a caller that
    does not go on with the turn puts back its ``exchanges()`` as they were before."""
    n_ctx = conversation.loaded.session.n_ctx
    alone = conversation.measure(prompt, images, history=False)
    if alone >= n_ctx:  # say so before dropping anything
        detach = " or /images clear to detach the waiting images," if images else ""
        raise ContextOverflow(
            f"this message needs {alone} tokens, and the context holds {n_ctx}",
            f"shorten it,{detach} or restart with a larger --ctx",
        )
    limit = n_ctx - answer_room  # the most the prompt may take
    exchanges = conversation.exchanges()

    def too_long(kept: Sequence[Exchange]) -> bool:
        """Longer than any context of ``n_ctx`` tokens can hold, whatever the tokens: no need
        to render and tokenize it whole to find out (a loaded chat of 200,000 turns, or one
        turn of 50 MB)."""
        chars = sum(len(ex.prompt) + len(ex.answer or "") for ex in kept)
        return chars > n_ctx * MAX_TOKEN_CHARS

    need = None if too_long(exchanges) else conversation.measure(prompt, images)
    if not exchanges or (need is not None and need <= limit):
        return None
    with_images = [i for i, ex in enumerate(exchanges) if ex.images]
    text_only = [i for i, ex in enumerate(exchanges) if not ex.images]

    def kept(n_with_images: int, n_text: int) -> list[int]:
        """The newest ``n_with_images`` image exchanges and ``n_text`` text ones, in order."""
        chosen = with_images[len(with_images) - n_with_images :] if n_with_images else []
        chosen += text_only[len(text_only) - n_text :] if n_text else []
        return sorted(chosen)

    def measured(indices: list[int]) -> int | None:
        """Tokens the turn takes after these exchanges (None: too long to be worth counting)."""
        candidate = [exchanges[i] for i in indices]
        if too_long(candidate):
            return None
        conversation.replace(candidate)
        return conversation.measure(prompt, images)

    def fits(indices: list[int], most: int) -> bool:
        tokens = measured(indices)
        return tokens is not None and tokens <= most

    base = measured(with_images) if with_images else alone  # every image exchange, no text
    if base is not None and base <= limit:
        target = base + (limit - base) // KEPT_SHARE
        n_images = len(with_images)
        n_text = _most_that_fit(len(text_only), lambda n: fits(kept(n_images, n), target))
    else:  # the images themselves must go: all the text first, then the oldest images
        target = alone + max(0, limit - alone) // KEPT_SHARE
        n_images = _most_that_fit(len(with_images), lambda n: fits(kept(n, 0), target))
        n_text = 0
    stays = kept(n_images, n_text)
    conversation.replace([exchanges[i] for i in stays])
    gone = sorted(set(range(len(exchanges))) - set(stays))
    if not gone:  # cannot happen (all of it did not fit), but never claim a drop
        return None
    return Dropped(
        exchanges=len(gone),
        images=sum(len(exchanges[i].images) for i in gone),
        oldest_only=gone == list(range(len(gone))),
        kept_with_images=sum(1 for i in stays if i < gone[-1] and exchanges[i].images),
        need=need,
        n_ctx=n_ctx,
    )


def _most_that_fit(count: int, fits: Callable[[int], bool]) -> int:
    """The largest ``n`` in 0..count for which ``fits(n)`` (true up to some ``n``, false
    after): tried at 1, 2, 4, ... then bisected, so no measurement is much longer than what
    fits."""
    fitting, step = 0, 1  # ``fitting`` is known to fit
    while step <= count and fits(step):
        fitting, step = step, step * 2
    too_many = min(step, count + 1)  # known not to fit (or past the end)
    while too_many - fitting > 1:
        middle = (fitting + too_many) // 2
        if fits(middle):
            fitting = middle
        else:
            too_many = middle
    return fitting

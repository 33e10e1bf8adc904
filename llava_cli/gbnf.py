"""A GBNF grammar read as llama.cpp reads it, and measured before llama.cpp is given it.

llama.cpp's parser (llama-grammar.cpp, ``llama_grammar_parser``) recurses in C once per
parenthesis, its left-recursion check once per rule reference, and it builds its first parse
stacks by copying every stack on the way, so memory grows with the square of a chain of
references. A grammar of a few kilobytes can therefore crash the process or take gigabytes
before any of llama.cpp's own checks answer; ``{5,3}`` even makes it loop until memory runs out.
This module follows the same syntax without recursion, counts what llama.cpp would build
(gbnf_rules.py works out what its parse stacks would do), and refuses a grammar over the limits
below, or one llama.cpp would refuse or choke on, with one line. It does not import llama.cpp.

Slightly over our ~400 lines: the reader follows llama.cpp's parser function by function,
which is easier to check side by side when it is in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .gbnf_rules import ALT as _ALT
from .gbnf_rules import analyse

GRAMMAR_MAX_BYTES = 1 << 20  # a grammar's text; hand-written ones are a few kilobytes
# Grammar elements llama.cpp would hold (8 bytes each), repetitions expanded.
GRAMMAR_MAX_ELEMENTS = 1 << 22
# Parentheses inside one another: llama.cpp's parser recursed into a crash at 30,000 (8 MiB stack).
GRAMMAR_MAX_NESTING = 2048
# Rule references in a row (llama.cpp's left-recursion check recurses along them).
GRAMMAR_MAX_CHAIN = 16_384
# References in a row that are followed by more symbols: each deepens the parse stacks that
# llama.cpp copies at every step (10,000 of them in a row took 654 MB before generation began).
GRAMMAR_MAX_STACK = 4096
# Parse stacks one step can expand into (an ambiguous grammar keeps every reading alive):
# llama.cpp took 0.03 s for 4,096, 0.5 s for 16,384 and 10 s for 65,536.
GRAMMAR_MAX_BRANCHES = 4096
MAX_REPETITION = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD for {m,n}

_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_HEX = frozenset("0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = frozenset('trn\\"[]-')


class GrammarError(ValueError):
    """A grammar llama.cpp would refuse, or one over the limits above."""


@dataclass(frozen=True)
class GrammarSize:
    rules: int
    elements: int
    nesting: int
    chain: int
    stack: int
    branches: int
    named_tokens: bool  # holds <token> terminals, which only a model's vocabulary can parse


def measure(text: str) -> GrammarSize:
    """What llama.cpp would build from ``text``; GrammarError if it would refuse it, or if it
    is over a limit. Cached: the same grammar is measured once however often it is used."""
    return _measure(text)


@lru_cache(maxsize=8)
def _measure(text: str) -> GrammarSize:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > GRAMMAR_MAX_BYTES:
        raise GrammarError(f"it is {size:,} bytes, over the limit of {GRAMMAR_MAX_BYTES:,}")
    if "\0" in text:
        raise GrammarError("it holds a NUL character")
    reader = _Reader(text)
    reader.read()
    shape = analyse(reader.rules)
    if shape.left_recursive is not None:
        name = reader.owner.get(shape.left_recursive, "?")
        raise GrammarError(
            f"rule {name!r} can begin with itself (left recursion), which llama.cpp cannot take"
        )
    chain, stack, branches = shape.chain, shape.stack, shape.branches
    if chain > GRAMMAR_MAX_CHAIN:
        raise GrammarError(
            f"it chains {chain:,} rule references, over the limit of {GRAMMAR_MAX_CHAIN:,}"
        )
    if stack > GRAMMAR_MAX_STACK:
        raise GrammarError(
            f"it nests {stack:,} rules inside one another, over the limit of {GRAMMAR_MAX_STACK:,}"
        )
    if branches > GRAMMAR_MAX_BRANCHES:
        raise GrammarError(
            f"one step of it can go {branches:,} ways (llama.cpp follows each), over the "
            f"limit of {GRAMMAR_MAX_BRANCHES:,}"
        )
    return GrammarSize(
        rules=len(reader.rules),
        elements=reader.elements,
        nesting=reader.max_nesting,
        chain=chain,
        stack=stack,
        branches=branches,
        named_tokens=reader.named_tokens,
    )


@dataclass
class _Frame:
    """A rule being read: a named rule, or the rule llama.cpp makes of a parenthesised group."""

    rule: int
    nested: bool
    items: list[int]
    last_symbol: int = 0  # where the last symbol's items begin (what a repetition repeats)
    prev_rules: int = 1  # rules the last symbol made (llama.cpp's n_prev_rules)
    symbols_before: int = 0  # for a group: symbols there were before it


class _Reader:
    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        self.symbols: dict[str, int] = {}
        self.n_symbols = 0  # named and generated, as llama.cpp numbers them
        self.rules: dict[int, list[int]] = {}
        self.first_use: dict[int, int] = {}  # a named rule's first reference
        self.elements = 0
        self.max_nesting = 0
        self.named_tokens = False
        self.current = ""  # the named rule being read
        self.owner: dict[int, str] = {}  # each rule's name, or the named rule it is part of

    # -- errors and small tokens, as llama-grammar.cpp has them ------------------------------

    def fail(self, what: str, pos: int) -> GrammarError:
        line = self.s.count("\n", 0, pos) + 1
        column = pos - (self.s.rfind("\n", 0, pos) + 1) + 1
        return GrammarError(f"{what} at line {line}, column {column}")

    def ch(self, pos: int) -> str:
        return self.s[pos] if pos < self.n else ""

    def space(self, pos: int, newline_ok: bool) -> int:
        s, n = self.s, self.n
        while pos < n:
            c = s[pos]
            if c == "#":
                while pos < n and s[pos] not in "\r\n":
                    pos += 1
            elif c in " \t" or (newline_ok and c in "\r\n"):
                pos += 1
            else:
                break
        return pos

    def name(self, pos: int) -> int:
        end = pos
        while end < self.n and self.s[end] in _WORD:
            end += 1
        if end == pos:
            raise self.fail("expecting a name", pos)
        return end

    def integer(self, pos: int) -> tuple[int, int]:
        end = pos
        while self.ch(end).isdigit() and self.ch(end).isascii():
            end += 1
        if end == pos:
            raise self.fail("expecting an integer", pos)
        if end - pos > 19:  # llama.cpp's std::stoull would throw
            raise self.fail("number out of range", pos)
        return int(self.s[pos:end]), end

    def char(self, pos: int) -> int:
        """The end of one character of a literal or a class (an escape or one code point)."""
        c = self.ch(pos)
        if c == "\\":
            e = self.ch(pos + 1)
            width = {"x": 2, "u": 4, "U": 8}.get(e)
            if width is not None:
                digits = self.s[pos + 2 : pos + 2 + width]
                if len(digits) != width or not set(digits) <= _HEX:
                    raise self.fail(f"expecting {width} hex digits", pos + 2)
                return pos + 2 + width
            if e in _SIMPLE_ESCAPES and e:
                return pos + 2
            raise self.fail("unknown escape", pos)
        if c:
            return pos + 1
        raise self.fail("unexpected end of input", pos)

    def token(self, pos: int) -> int:
        if self.ch(pos) != "<":
            raise self.fail("expecting '<'", pos)
        pos += 1
        if self.ch(pos) == "[":
            value, pos = self.integer(pos + 1)
            if value > 0xFFFFFFFF:
                raise self.fail("token id too big", pos)
            for closing in "]>":
                if self.ch(pos) != closing:
                    raise self.fail(f"expecting '{closing}'", pos)
                pos += 1
            return pos
        self.named_tokens = True
        end = self.s.find(">", pos)
        if end < 0:
            raise self.fail("expecting '>'", self.n)
        return end + 1

    # -- symbols and rules ---------------------------------------------------------------------

    def symbol(self, name: str) -> int:
        if name not in self.symbols:
            self.symbols[name] = self.n_symbols
            self.n_symbols += 1
        return self.symbols[name]

    def new_rule(self) -> int:
        self.n_symbols += 1
        self.owner[self.n_symbols - 1] = self.current
        return self.n_symbols - 1

    def spend(self, elements: int, pos: int) -> None:
        self.elements += elements
        if self.elements > GRAMMAR_MAX_ELEMENTS:
            raise self.fail(f"it expands to more than {GRAMMAR_MAX_ELEMENTS:,} elements", pos)

    def finish(self, frame: _Frame, pos: int) -> None:
        self.spend(1, pos)  # END
        self.rules[frame.rule] = frame.items

    def read(self) -> None:
        pos = self.space(0, True)
        while pos < self.n:
            pos = self.rule(pos)
        # as llama.cpp: every name seen must be defined, even where a later definition of a
        # rule dropped the reference
        for name, symbol in self.symbols.items():
            if symbol not in self.rules:
                raise self.fail(f"rule {name!r} is used but never defined", self.first_use[symbol])
        if "root" not in self.symbols:
            raise GrammarError("it has no 'root' rule (where every answer starts)")

    def rule(self, pos: int) -> int:
        end = self.name(pos)
        self.current = self.s[pos:end]
        rule_id = self.symbol(self.current)
        self.owner[rule_id] = self.current
        pos = self.space(end, False)
        if self.s[pos : pos + 3] != "::=":
            raise self.fail("expecting ::=", pos)
        pos = self.alternates(self.space(pos + 3, True), _Frame(rule_id, False, []))
        c = self.ch(pos)
        if c == "\r":
            pos += 2 if self.ch(pos + 1) == "\n" else 1
        elif c == "\n":
            pos += 1
        elif c:
            raise self.fail("expecting a newline or the end", pos)
        return self.space(pos, True)

    def alternates(self, pos: int, top: _Frame) -> int:
        """Read a rule's alternatives, groups included, with a stack of frames for groups."""
        frames = [top]
        while True:
            frame = frames[-1]
            pos, opened = self.sequence(pos, frame)
            if opened is not None:
                frames.append(opened)
                if len(frames) - 1 > GRAMMAR_MAX_NESTING:
                    raise self.fail(f"parentheses nest deeper than {GRAMMAR_MAX_NESTING:,}", pos)
                self.max_nesting = max(self.max_nesting, len(frames) - 1)
                continue
            if self.ch(pos) == "|":
                self.spend(1, pos)
                frame.items.append(_ALT)
                frame.last_symbol, frame.prev_rules = len(frame.items), 1
                pos = self.space(pos + 1, True)
                continue
            self.finish(frame, pos)
            frames.pop()
            if not frames:
                return pos
            if self.ch(pos) != ")":
                raise self.fail("expecting ')'", pos)
            parent = frames[-1]
            parent.prev_rules = max(1, self.n_symbols - frame.symbols_before)
            parent.last_symbol = len(parent.items)
            self.spend(1, pos)
            parent.items.append(-frame.rule - 1)
            pos = self.space(pos + 1, parent.nested)

    def terminal(self, frame: _Frame, count: int, start: int, close: int) -> int:
        """A literal or a character class of ``count`` elements read, its closing quote or
        bracket at ``close``: counted as llama.cpp counts it; the position after it."""
        frame.last_symbol, frame.prev_rules = len(frame.items), 1
        if count:
            self.spend(count, start)
            frame.items.append(count)
        return self.space(close + 1, frame.nested)

    def sequence(self, pos: int, frame: _Frame) -> tuple[int, _Frame | None]:
        """Read symbols until the sequence ends, or until a group opens (returned, to be read
        before this sequence goes on)."""
        items = frame.items
        while pos < self.n:
            c = self.s[pos]
            start = pos
            if c == '"':
                pos += 1
                count = 0
                while self.ch(pos) != '"':
                    pos = self.char(pos)
                    count += 1
                pos = self.terminal(frame, count, start, pos)
            elif c == "[":
                pos += 1
                if self.ch(pos) == "^":
                    pos += 1
                count = 0
                while self.ch(pos) != "]":
                    pos = self.char(pos)
                    count += 1
                    if self.ch(pos) == "-" and self.ch(pos + 1) != "]":
                        pos = self.char(pos + 1)
                        count += 1
                pos = self.terminal(frame, count, start, pos)
            elif c in "<!":
                pos = self.token(pos + (c == "!"))
                frame.last_symbol, frame.prev_rules = len(items), 1
                self.spend(1, start)
                items.append(1)
                pos = self.space(pos, frame.nested)
            elif c in _WORD:
                end = self.name(pos)
                ref = self.symbol(self.s[pos:end])
                self.first_use.setdefault(ref, pos)
                frame.last_symbol, frame.prev_rules = len(items), 1
                self.spend(1, start)
                items.append(-ref - 1)
                pos = self.space(end, frame.nested)
            elif c == "(":
                before = self.n_symbols
                group = _Frame(self.new_rule(), True, [], symbols_before=before)
                return self.space(pos + 1, True), group
            elif c == ".":
                frame.last_symbol, frame.prev_rules = len(items), 1
                self.spend(1, start)
                items.append(1)
                pos = self.space(pos + 1, frame.nested)
            elif c in "*+?":
                pos = self.space(pos + 1, frame.nested)
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                self.repeat(frame, low, high, start)
            elif c == "{":
                pos, low, high = self.braces(pos, frame)
                self.repeat(frame, low, high, start)
            else:
                break
        return pos, None

    def braces(self, pos: int, frame: _Frame) -> tuple[int, int, int | None]:
        pos = self.space(pos + 1, frame.nested)
        if not (self.ch(pos).isdigit() and self.ch(pos).isascii()):
            raise self.fail("expecting an integer", pos)
        low, pos = self.integer(pos)
        pos = self.space(pos, frame.nested)
        high: int | None = None
        if self.ch(pos) == "}":
            high = low
        elif self.ch(pos) == ",":
            pos = self.space(pos + 1, frame.nested)
            if self.ch(pos).isdigit() and self.ch(pos).isascii():
                high, pos = self.integer(pos)
                pos = self.space(pos, frame.nested)
            if self.ch(pos) != "}":
                raise self.fail("expecting '}'", pos)
        else:
            raise self.fail("expecting ','", pos)
        if low > MAX_REPETITION:
            raise self.fail(f"a repetition of more than {MAX_REPETITION:,}", pos)
        if high is not None and high > MAX_REPETITION:
            high = None  # as llama.cpp: no upper bound
        if high is not None and high < low:
            # llama.cpp would count down from high - low as an unsigned number: forever
            raise self.fail(f"{{{low},{high}}} has its maximum below its minimum", pos)
        return self.space(pos + 1, frame.nested), low, high

    def repeat(self, frame: _Frame, low: int, high: int | None, pos: int) -> None:
        """llama.cpp's rewrite: S{m,n} -> S (m times) then n - m nested optional rules."""
        items = frame.items
        if frame.last_symbol == len(items):
            raise self.fail("expecting something to repeat before */+/?/{", pos)
        prev = items[frame.last_symbol :]
        size = sum(1 if item <= 0 else item for item in prev)
        total = high if high else (low or 1)
        if frame.prev_rules * total > MAX_REPETITION:
            raise self.fail(
                f"a repetition that makes more than {MAX_REPETITION:,} rules (nested repetitions "
                "multiply)",
                pos,
            )
        optional = 1 if high is None else high - low
        # copies of S, and each optional rule: S, a reference, an ALT and an END
        self.spend(size * (low - 1) + optional * (size + 3) + 1, pos)
        if low == 0:
            del items[frame.last_symbol :]
        else:
            items.extend(prev * (low - 1))
        last = -1
        for i in range(optional):
            rule_id = self.new_rule()
            body = list(prev)
            if i > 0 or high is None:
                body.append(-(rule_id if high is None else last) - 1)
            body.append(_ALT)
            self.rules[rule_id] = body
            last = rule_id
        if optional:
            items.append(-last - 1)
        frame.prev_rules *= total

"""What llama.cpp does with a grammar's rules, worked out in advance: it expands references
until a terminal, keeping one parse stack per way (llama-grammar.cpp, ``advance_stack``).

A rule is a list of items: ``ALT`` starts another alternative, ``n > 0`` is a run of ``n``
terminal elements, ``n < 0`` a reference to rule ``-n - 1`` (``gbnf._Reader`` builds them).
"""

from __future__ import annotations

from dataclasses import dataclass

ALT = 0
_SATURATED = 1 << 62  # counts stop growing here (they are only compared with limits)

Alternatives = list[list[int]]


@dataclass(frozen=True)
class RuleShape:
    chain: int  # the longest chain of references (recursion not followed round)
    stack: int  # of those, references followed by more symbols: how deep one step stacks
    branches: int  # the most parse stacks one step can expand into
    # A rule that can begin with itself, through rules that may match nothing: llama.cpp only
    # sees left recursion when an alternative is literally empty, and otherwise expands until
    # memory runs out (std::bad_alloc, an abort).
    left_recursive: int | None


def _alternatives(items: list[int]) -> Alternatives:
    alts: Alternatives = [[]]
    for item in items:
        if item == ALT:
            alts.append([])
        else:
            alts[-1].append(item)
    return alts


def _nullable(rules: dict[int, Alternatives]) -> set[int]:
    """Rules that can match nothing (a worklist, linear in the grammar's size)."""
    waiting: dict[tuple[int, int], int] = {}  # an alternative: references not yet nullable
    users: dict[int, list[tuple[int, int]]] = {}
    found: set[int] = set()
    todo: list[int] = []
    for rule, alts in rules.items():
        for k, alt in enumerate(alts):
            if any(item > 0 for item in alt):
                continue  # holds a terminal
            refs = [-item - 1 for item in alt]
            waiting[rule, k] = len(refs)
            for ref in refs:
                users.setdefault(ref, []).append((rule, k))
            if not refs and rule not in found:
                found.add(rule)
                todo.append(rule)
    while todo:
        for user in users.get(todo.pop(), ()):
            waiting[user] -= 1
            if waiting[user] == 0 and user[0] not in found:
                found.add(user[0])
                todo.append(user[0])
    return found


def _post_order(graph: dict[int, list[int]]) -> tuple[list[int], tuple[int, int] | None]:
    """The nodes, each after everything it leads to; and an edge that closes a cycle, if any."""
    order: list[int] = []
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    for start, first in graph.items():
        if start in state:
            continue
        state[start] = 1
        path = [(start, iter(first))]
        while path:
            node, children = path[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                order.append(node)
                path.pop()
            elif child not in state:
                state[child] = 1
                path.append((child, iter(graph[child])))
            elif state[child] == 1:
                return order, (node, child)
    return order, None


def analyse(rules: dict[int, list[int]]) -> RuleShape:
    """What llama.cpp's stacks would do with ``rules`` (a rule id to its items)."""
    alts = {rule: _alternatives(items) for rule, items in rules.items()}
    empty = _nullable(alts)
    leftmost: dict[int, list[int]] = {}
    for rule, rule_alts in alts.items():
        firsts = []
        for alt in rule_alts:
            for item in alt:
                if item > 0:
                    break
                firsts.append(-item - 1)
                if -item - 1 not in empty:
                    break
        leftmost[rule] = firsts
    order, cycle = _post_order(leftmost)
    if cycle is not None:
        return RuleShape(0, 0, 0, left_recursive=cycle[1])
    # Parse stacks one expansion makes from a rule's start (only its leftmost references
    # count, so the order above has them ready), then from any point inside a rule.
    branches: dict[int, int] = {}
    for rule in order:
        total = 0
        for alt in alts[rule]:
            for item in alt:
                if item > 0:
                    total += 1
                    break
                total += branches[-item - 1]
                if -item - 1 not in empty:
                    break
            else:
                total += 1  # matched nothing: the stack goes on with what follows the rule
        branches[rule] = min(total, _SATURATED)
    widest = max(branches.values(), default=1)
    for rule_alts in alts.values():
        for alt in rule_alts:
            after = 1
            for item in reversed(alt):
                ref = -item - 1
                after = 1 if item > 0 else branches[ref] + (after if ref in empty else 0)
                after = min(after, _SATURATED)
                widest = max(widest, after)
    chain, stack = _depths(alts)
    return RuleShape(chain, stack, widest, left_recursive=None)


def _depths(alts: dict[int, Alternatives]) -> tuple[int, int]:
    """The longest chain of rule references, and of those that are followed by more symbols
    (each deepens a parse stack). Recursion is not followed round: it only goes deeper as
    text is generated."""
    edges: dict[int, list[tuple[int, int]]] = {}
    for rule, rule_alts in alts.items():
        out = edges[rule] = []
        for alt in rule_alts:
            for k, item in enumerate(alt):
                if item < 0:
                    out.append((-item - 1, int(k + 1 < len(alt))))
    done: dict[int, tuple[int, int]] = {}
    active: set[int] = set()
    for root in edges:
        if root in done:
            continue
        todo: list[tuple[int, int]] = [(root, 0)]
        active.add(root)
        while todo:
            node, k = todo[-1]
            out = edges[node]
            if k < len(out):
                todo[-1] = (node, k + 1)
                child = out[k][0]
                if child not in done and child not in active:
                    active.add(child)
                    todo.append((child, 0))
                continue
            chain = stack = 0
            for child, followed in out:
                if child in done:
                    chain = max(chain, done[child][0] + 1)
                    stack = max(stack, done[child][1] + followed)
            done[node] = (chain, stack)
            active.discard(node)
            todo.pop()
    return max((d[0] for d in done.values()), default=0), max(
        (d[1] for d in done.values()), default=0
    )

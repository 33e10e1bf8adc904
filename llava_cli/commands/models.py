"""``llava list``, ``show``, ``rm`` and ``cache``: what is on disk, and what can be pulled.
The tables of ``list`` are in ``listing``."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import registry, render, store
from ..config import DEFAULT_CTX, environment
from ..errors import EXIT_OK, LlavaError, ModelFileError, ModelNotAvailable, UsageError
from ..gguf_checks import projector_type
from ..hub import RemoteFile
from ..modelref import (
    Target,
    find_local,
    find_mmproj,
    local_target,
    looks_like_path,
    plan,
    quant_of,
    registry_target,
)
from ..registry import ModelSpec, Ref, parse_ref
from ..text import display_path
from ..units import plural
from .listing import empty_hint, list_available, list_pulled
from .pull import explained

__all__ = ["cache_clear", "cache_info", "empty_hint", "list_available", "list_pulled", "rm", "show"]


def show(text: str, *, ctx: int | None = None, offline: bool = False) -> int:
    offline = environment().offline(offline)
    if looks_like_path(text):
        return show_file(text, ctx=ctx)
    ref = parse_ref(text)
    with explained(ref):
        target, spec = _target(ref, offline=offline)
    local = find_local(ref)
    lines: list[tuple[str, str]] = [("name", target.name), ("ref", target.ref)]
    if spec is not None:
        lines += [
            ("aliases", ", ".join(spec.aliases) or "-"),
            ("description", spec.description),
            ("license", spec.license),
            ("parameters", spec.parameters),
            ("context length", str(spec.context_length)),
        ]
    lines += [
        ("repo", target.repo),
        ("revision", target.revision),
        ("chat format", _chat_format(target.chat_format)),
    ]
    if spec is not None and spec.from_listing:
        lines.append((f"quant {target.quant} (default)", _file_line(target.model)))
    elif spec is not None:
        for quant, file in spec.quants.items():
            mark = " (default)" if quant == spec.default_quant else ""
            lines.append((f"quant {quant}{mark}", _file_line(file)))
    else:
        lines.append((f"quant {target.quant}", _file_line(target.model)))
    lines.append(("mmproj", _file_line(target.mmproj)))
    if local is not None:
        lines += [
            ("model path", display_path(local.model)),
            ("mmproj path", display_path(local.mmproj)),
        ]
    else:
        lines.append(("pulled", f"no — llava pull {target.ref}"))
    lines.append(("memory", _memory(target, local, ctx, spec)))
    render.fields(lines)
    return EXIT_OK


def show_file(text: str, *, ctx: int | None = None) -> int:
    """A local GGUF's facts, from its header (nothing is loaded): what it is, how big, its
    projector, and the memory it would take."""
    from ..gguf_file import read_gguf
    from ..memory import kv_cache_bytes

    path = Path(text).expanduser()
    if not os.path.lexists(path):
        raise ModelFileError(f"model file {text} does not exist", "check the path")
    info = read_gguf(path, "model")
    arch = info.architecture or "?"
    lines = [("file", text), ("size", render.human_bytes(info.file_size))]
    name = info.get_str("general.name")
    if name:
        lines.append(("name", name))
    lines.append(("architecture", arch))
    if arch == "clip":
        lines.append(("projector type", projector_type(info) or "?"))
        lines.append(("use", "this is a projector: pass it as --mmproj, with its model as --model"))
        render.fields(lines)
        return EXIT_OK
    count = sum(math.prod(t.shape) for t in info.tensors.values())
    lines.append(("parameters", _count(count) if count else "none: a vocabulary-only file"))
    quant = quant_of(path.name)
    if quant:
        lines.append(("quant", f"{quant} (from the file name)"))
    trained = info.get_int(f"{arch}.context_length")
    lines.append(("context length", str(trained) if trained else "not stated"))
    template = "tokenizer.chat_template" in info.metadata
    lines.append(
        ("chat template", "its own" if template else "none: the LLaVA-1.5/Vicuna layout is used")
    )
    sizes = [info.file_size]
    try:
        mmproj = read_gguf(find_mmproj(path), "mmproj")
    except LlavaError as exc:
        lines.append(("mmproj", f"{exc.message} — {exc.hint}" if exc.hint else exc.message))
    else:
        kind = projector_type(mmproj) or "?"
        where = display_path(mmproj.path)
        lines.append(("mmproj", f"{where}, {render.human_bytes(mmproj.file_size)}, type {kind}"))
        sizes.append(mmproj.file_size)
    n_ctx = ctx or min(DEFAULT_CTX, trained or DEFAULT_CTX)
    kv = kv_cache_bytes(info, n_ctx)
    weights = "weights and projector" if len(sizes) == 2 else "weights (no projector)"
    lines.append(
        (
            "memory",
            f"about {render.human_bytes(sum(sizes) + kv)}: {weights} "
            f"{render.human_bytes(sum(sizes))}, KV cache {render.human_bytes(kv)} "
            f"for {n_ctx} tokens",
        )
    )
    render.fields(lines)
    return EXIT_OK


def _count(n: int) -> str:
    """``494M``, ``1.71B``: a parameter count as model cards write it."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _target(ref: Ref, *, offline: bool) -> tuple[Target, ModelSpec | None]:
    if not ref.is_repo:
        target, spec = registry_target(ref), registry.load().get(ref.name)
        unsized = target.model.size is None or target.mmproj.size is None
        if unsized and not offline and find_local(ref) is None:
            try:  # the sizes the registry does not pin, from the hub (two HEAD requests)
                return _with_remote(target, plan(ref)[1]), spec
            except LlavaError as exc:
                render.info(f"file sizes unknown: {exc.message}")
        return target, spec
    local = find_local(ref)
    if local is not None:
        record = store.record_for(local.name)
        if record is not None:
            return _record_target(record), None
        return local_target(ref, local), None  # in the hub cache, from another tool
    if offline:
        raise ModelNotAvailable(
            f"{ref} is not pulled and offline mode is on",
            f"without --offline (and HF_HUB_OFFLINE), `llava show {ref}` asks the hub",
        )
    target, remotes = plan(ref)
    return _with_remote(target, remotes), None


def _with_remote(target: Target, remotes: list[RemoteFile]) -> Target:
    sized = [registry.FileSpec(r.file, r.size, r.digest if r.is_sha256 else None) for r in remotes]
    return replace(target, model=sized[0], mmproj=sized[1])


def _record_target(r: store.Pulled) -> Target:
    def spec(f: store.StoredFile) -> registry.FileSpec:
        return registry.FileSpec(f.file, f.size, f.digest if len(f.digest) == 64 else None)

    return Target(
        r.ref, r.name, r.repo, r.revision, r.quant, spec(r.model), spec(r.mmproj), r.chat_format
    )


def _chat_format(fmt: str) -> str:
    if fmt == "llava":
        return "LLaVA-1.5/Vicuna (llava)"
    if fmt == "gguf":
        return "the GGUF's own template (else LLaVA-1.5)"
    return f"llama.cpp's built-in {fmt}"


def _file_line(file: registry.FileSpec) -> str:
    if not file.file:
        return "chosen from the repo's listing at pull time, checked against its sha256"
    sha = file.sha256 or "checked against the hub's LFS sha256"
    return f"{file.file}, {render.human_bytes(file.size)}, sha256 {sha}"


def _memory(target: Target, local: Any, ctx: int | None, spec: ModelSpec | None) -> str:
    """Weights + projector + the KV cache at the context ``ask`` would use (f16 K and V)."""
    sizes = [target.model.size, target.mmproj.size]
    if local is not None:
        sizes = [Path(local.model).stat().st_size, Path(local.mmproj).stat().st_size]
    if sizes[0] is None or sizes[1] is None:
        return "unknown until the hub reports the file sizes (llava pull)"
    weights = sizes[0] + sizes[1]
    n_ctx = ctx or min(DEFAULT_CTX, spec.context_length if spec else DEFAULT_CTX)
    if local is None:
        return (
            f"about {render.human_bytes(weights)} for weights and projector, plus the KV cache "
            f"for {n_ctx} tokens (exact figure once pulled)"
        )
    kv = _kv_bytes(Path(local.model), n_ctx)
    return (
        f"about {render.human_bytes(weights + kv)}: weights and projector "
        f"{render.human_bytes(weights)}, KV cache {render.human_bytes(kv)} for {n_ctx} tokens"
    )


def _kv_bytes(model: Path, n_ctx: int) -> int:
    from ..gguf_file import read_gguf
    from ..memory import kv_cache_bytes

    return kv_cache_bytes(read_gguf(model, "model"), n_ctx)


def rm(refs: list[str], *, yes: bool = False) -> int:
    for text in refs:
        record = _pulled(text)
        size = record.size if record.present() else 0
        if not yes:
            if not sys.stdin.isatty():
                raise UsageError(f"not removing {record.ref} without confirmation", "pass -y")
            if not render.confirm(f"Remove {record.ref} ({render.human_bytes(size)})?"):
                render.info("nothing removed")
                continue
        others = [r for r in store.records() if r.ref != record.ref]
        freed = store.remove(record, others)
        render.info(f"removed {record.ref} ({render.human_bytes(freed)} freed)")
    return EXIT_OK


def _pulled(text: str) -> store.Pulled:
    """The record ``rm`` acts on: by its own name first, so an entry since dropped from the
    registry, or one whose files are already gone, can still be removed."""
    records = list(store.records())
    by_ref = {r.ref.lower(): r for r in records}
    if text.lower() in by_ref:
        return by_ref[text.lower()]
    ref = parse_ref(text)
    if not ref.is_repo and registry.load().find(ref.name) is not None:
        canonical = registry_target(ref).ref.lower()
        if canonical in by_ref:
            return by_ref[canonical]
    name = ref.name.lower()
    matches = [r for r in records if r.ref.rsplit(":", 1)[0].lower() == name]
    if len(matches) == 1 and not ref.quant:
        return matches[0]
    if len(matches) > 1 and not ref.quant:
        raise UsageError(
            f"{text} names several pulled models",
            "choose one: " + ", ".join(r.ref for r in matches),
        )
    raise ModelNotAvailable(
        f"{text} was not pulled by llava",
        "see `llava list`; files other tools put in the Hugging Face cache are theirs to remove",
    )


def cache_info() -> int:
    from ..cache import PrefixCache

    settings = environment()
    info = PrefixCache.default(settings).info()
    cap = "LLAVA_CACHE_SIZE" if settings.cache_size else "the default; LLAVA_CACHE_SIZE sets it"
    render.fields(
        [
            ("folder", str(info.folder)),
            ("entries", str(info.entries)),
            ("size", f"{render.human_bytes(info.size)} of {render.human_bytes(info.cap)} ({cap})"),
        ]
    )
    return EXIT_OK


def cache_clear() -> int:
    from ..cache import PrefixCache

    gone = PrefixCache.default().clear()
    removed = plural(gone.entries, "saved prefix", "saved prefixes")
    render.info(f"removed {removed} ({render.human_bytes(gone.size)})")
    return EXIT_OK

"""``llava list``, ``show``, ``rm`` and ``cache``: what is on disk, and what can be pulled."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .. import registry, render, store
from ..config import DEFAULT_CTX, hub_offline
from ..errors import EXIT_OK, LlavaError, ModelNotAvailable, UsageError
from ..hub import RemoteFile
from ..modelref import Target, find_local, local_target, plan, registry_target
from ..registry import ModelSpec, Ref, parse_ref
from ..text import escaped


def list_pulled(*, json: bool = False) -> int:
    skipped: list[tuple[Path, str]] = []
    records = list(store.records(skipped))
    _note_skipped(skipped)
    if json:
        render.json_value([_record_json(r) for r in records])
        return EXIT_OK
    if not records:
        render.info("no models pulled yet — try: llava pull " + registry.load().default)
        return EXIT_OK
    rows = [["NAME", "QUANT", "SIZE", "PULLED", "PATH"]]
    for r in records:
        when = time.strftime("%Y-%m-%d", time.localtime(r.pulled_at)) if r.pulled_at else "?"
        size = render.human_bytes(r.size) if r.present() else "missing"
        rows.append([r.ref.rsplit(":", 1)[0], r.quant, size, when, r.model.path])
    render.table(rows)
    return EXIT_OK


def _note_skipped(skipped: list[tuple[Path, str]]) -> None:
    """One line on stderr for the files in the records folder that are not records."""
    if not skipped:
        return
    path, why = skipped[0]
    more = f" (and {len(skipped) - 1} more files in {path.parent})" if len(skipped) > 1 else ""
    render.info(f"skipped {path}: {why}{more} — delete it, or pull the model again")


def _record_json(r: store.Pulled) -> dict[str, Any]:
    return asdict(r) | {"size": r.size, "present": r.present()}


def list_available(*, json: bool = False) -> int:
    reg = registry.load()
    pulled = {r.ref for r in store.records() if r.present()}
    if json:
        render.json_value([_spec_json(s, reg, pulled) for s in reg.models.values()])
        return EXIT_OK
    rows = [["NAME", "PARAMS", "QUANT", "DOWNLOAD", "LICENSE", "PULLED", "DESCRIPTION"]]
    for spec in reg.models.values():
        quant, file = spec.quant(None)
        name = spec.key + (" (default)" if spec.key == reg.default else "")
        rows.append(
            [
                name,
                spec.parameters,
                quant,
                _download_size(file.size, spec.mmproj.size),
                spec.license,
                "yes" if f"{spec.key}:{quant}" in pulled else "",
                _short(spec.description),
            ]
        )
    render.table(rows)
    return EXIT_OK


def _short(text: str, width: int = 60) -> str:
    first = text.split(". ", maxsplit=1)[0].rstrip(".")
    return first if len(first) <= width else first[: width - 1].rstrip(" ,;") + "…"


def _download_size(model: int | None, mmproj: int | None) -> str:
    if model is None or mmproj is None:
        return "?"
    return render.human_bytes(model + mmproj)


def _spec_json(spec: ModelSpec, reg: registry.Registry, pulled: set[str]) -> dict[str, Any]:
    data = asdict(spec)
    data["source"] = str(spec.source)
    data["default"] = spec.key == reg.default
    quants = list(spec.quants) or [spec.default_quant]
    data["pulled"] = sorted(q for q in quants if f"{spec.key}:{q}" in pulled)
    return data


def show(text: str, *, ctx: int | None = None) -> int:
    ref = parse_ref(text)
    target, spec = _target(ref)
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
        lines += [("model path", str(local.model)), ("mmproj path", str(local.mmproj))]
    else:
        lines.append(("pulled", f"no — llava pull {target.ref}"))
    lines.append(("memory", _memory(target, local, ctx, spec)))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        sys.stdout.write(f"{escaped(key):<{width}}  {escaped(value)}\n")
    return EXIT_OK


def _target(ref: Ref) -> tuple[Target, ModelSpec | None]:
    if not ref.is_repo:
        target, spec = registry_target(ref), registry.load().get(ref.name)
        unsized = target.model.size is None or target.mmproj.size is None
        if unsized and not hub_offline() and find_local(ref) is None:
            try:  # the sizes the registry does not pin, from the hub (two HEAD requests)
                return _with_remote(target, plan(ref)[1]), spec
            except LlavaError as exc:
                render.info(f"could not ask the hub for sizes: {exc.one_line()}")
        return target, spec
    local = find_local(ref)
    if local is not None:
        record = store.record_for(local.name)
        if record is not None:
            return _record_target(record), None
        return local_target(ref, local), None  # in the hub cache, from another tool
    if hub_offline():
        raise ModelNotAvailable(f"{ref} is not pulled and offline mode is on")
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

    info = PrefixCache.default().info()
    sys.stdout.write(
        f"folder   {escaped(str(info.folder))}\n"
        f"entries  {info.entries}\n"
        f"size     {render.human_bytes(info.size)} of {render.human_bytes(info.cap)} "
        "(LLAVA_CACHE_SIZE)\n"
    )
    return EXIT_OK


def cache_clear() -> int:
    from ..cache import PrefixCache

    gone = PrefixCache.default().clear()
    render.info(f"removed {gone.entries} saved prefixes ({render.human_bytes(gone.size)})")
    return EXIT_OK

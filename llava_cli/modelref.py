"""Turn what the user named into two GGUF paths, pulling them first when needed.

A model is named three ways: local files (``--model PATH --mmproj PATH``), a registry entry
(``NAME[:QUANT]``, aliases too), or any hub repo (``OWNER/REPO[:QUANT]``). With nothing named:
``LLAVA_MODEL`` (read by the CLI), then ``config.toml``'s ``model``, then the registry default.
Whatever is already on disk, in llava's records or the shared hub cache, is used without a
network request.

Longer than our ~400 lines on purpose: naming a model and pulling it share the same
targets and records (what is on disk decides whether and what to fetch); split, each half
would have to re-derive the other's view of the cache.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import registry, store
from .config import Environment, environment, paths
from .digests import is_commit
from .errors import ConfigError, DownloadError, ModelFileError, ModelNotAvailable, UsageError
from .gguf_file import check_model, read_gguf
from .registry import FileSpec, Ref
from .store import RepoCache
from .templates import OWN_FORMATS, check_format_name

if TYPE_CHECKING:
    from . import hub  # imported where a pull needs it: naming local files must not load it

QUANT_PREFERENCE = ("Q4_K_M", "Q8_0")
MMPROJ_PREFERENCE = ("F16", "BF16", "Q8_0", "F32")
_PATH_PREFIXES = ("/", "./", "../", "~")
_QUANT_LABEL = re.compile(r"(?:^|[-._])(I?Q\d[A-Z0-9_]*|BF16|F16|F32|INT4|INT8)$")


@dataclass(frozen=True)
class ModelFiles:
    name: str  # what to call it in output
    model: Path
    mmproj: Path
    chat_format: str | None = None  # the registry's layout for this model, when it has one


@dataclass(frozen=True)
class Target:
    """A model named by reference: its hub repo, revision and two files."""

    ref: str  # canonical NAME:QUANT or OWNER/REPO:QUANT
    name: str  # display name
    repo: str
    revision: str
    quant: str
    model: FileSpec
    mmproj: FileSpec
    chat_format: str

    @property
    def from_listing(self) -> bool:
        """A registry entry that names no files: they come from the repo's listing."""
        return not self.model.file

    def with_files(self, model: str, mmproj: str) -> Target:
        """A listed entry's target once its files are chosen."""
        return replace(self, model=FileSpec(model), mmproj=FileSpec(mmproj))


@dataclass(frozen=True)
class PullResult:
    files: ModelFiles
    fetched: int  # bytes downloaded by this pull (0: everything was already here)


def looks_like_path(ref: str) -> bool:
    """A GGUF file name, a path spelled as one (``./x``, ``/x``, ``~/x``: never a reference),
    or a file that exists: a folder called ``tiny`` is not a model."""
    if ref.lower().endswith(".gguf") or ref.startswith(_PATH_PREFIXES):
        return True
    try:
        return Path(ref).expanduser().is_file()
    except (OSError, ValueError):  # a name too long for a path, a NUL: not a file
        return False


_LOADED: list[tuple[Environment, registry.Registry]] = []  # the running command's


def _registry() -> registry.Registry:
    """``registry.load()``, parsed once per command (config.reading_once): resolving a model
    asks for it up to three times (the default, the reference's format, its target). Outside
    a command, each time."""
    running = environment()  # the command's own record while it runs; a fresh one outside
    if not (_LOADED and _LOADED[0][0] is running):
        _LOADED[:] = [(running, registry.load())]
    return _LOADED[0][1]


def default_ref() -> str:
    from .config import settings

    return settings().get("model") or _registry().default


def resolve(
    model: str | None, mmproj: str | None, *, offline: bool, progress: hub.Progress | None = None
) -> ModelFiles:
    """The files ``ask``/``chat`` load: local paths, or a reference, pulled when missing.

    Without ``progress`` a missing model is an error instead of a download.
    """
    found = resolve_local(model, mmproj, offline=offline)
    if isinstance(found, ModelFiles):
        return found
    if progress is None:
        name = str(found) if found.is_repo else registry_target(found).ref
        raise ModelNotAvailable(f"{name} is not pulled", f"run: llava pull {name}")
    return pull(found, progress).files


def resolve_local(model: str | None, mmproj: str | None, *, offline: bool) -> ModelFiles | Ref:
    """Local files, or the files on disk for a reference; else the reference still to pull
    (with ``offline``, a ModelNotAvailable saying what to run instead). No network request."""
    text = model or default_ref()
    if looks_like_path(text):
        path = Path(text).expanduser()
        _check_exists(path, text, "model")
        if mmproj:
            _check_exists(Path(mmproj).expanduser(), mmproj, "mmproj")
            return ModelFiles(path.name, path, Path(mmproj).expanduser())
        # A missing, broken or weightless model says so before its projector is looked for.
        check_model(read_gguf(path, "model"))
        return ModelFiles(path.name, path, find_mmproj(path))
    if mmproj:
        raise UsageError(
            f"--mmproj (or LLAVA_MMPROJ) goes with a local model file, not with {text!r}",
            "a model named by reference brings its own projector; unset LLAVA_MMPROJ",
        )
    ref = registry.parse_ref(text)
    check_registry_format(ref)
    found = find_local(ref)
    if found is not None:
        return found
    if offline:
        name = str(ref) if ref.is_repo else registry_target(ref).ref
        raise ModelNotAvailable(
            f"{name} is not on this machine and offline mode is on", f"run: llava pull {name}"
        )
    return ref


def _check_exists(path: Path, text: str, role: str) -> None:
    """A file named on the command line that is not there, named as the user wrote it."""
    try:
        there = os.path.lexists(path)
    except ValueError:  # a NUL byte: read_gguf names it
        return
    if not there:
        flag = "--model" if role == "model" else "--mmproj"
        raise ModelFileError(
            f"{role} file {text} does not exist", f"pass an existing GGUF file with {flag} PATH"
        )


def find_local(ref: Ref) -> ModelFiles | None:
    """The model's files if they are on disk (llava's record, else the hub cache); no network."""
    target = registry_target(ref) if not ref.is_repo else None
    record = store.record_for(target.ref if target else _repo_ref(ref))
    if record is not None and record.present() and (target is None or _matches(record, target)):
        # The registry's format as it is now, not as it was when the model was pulled.
        fmt = target.chat_format if target is not None else record.chat_format
        return ModelFiles(record.ref, Path(record.model.path), Path(record.mmproj.path), fmt)
    if target is None:
        return _local_repo(ref)
    if target.from_listing:
        listed = _local_repo(Ref(target.repo, target.quant), target.revision)
        if listed is None:
            return None
        return ModelFiles(target.ref, listed.model, listed.mmproj, target.chat_format)
    cache = RepoCache.of(target.repo)
    commit = cache.commit_for(target.revision)
    found = [
        cache.find(spec.file, digest=spec.sha256, size=spec.size, commit=commit)
        for spec in (target.model, target.mmproj)
    ]
    if found[0] is None or found[1] is None:
        return None
    return ModelFiles(target.ref, found[0], found[1], target.chat_format)


def _matches(record: store.Pulled, target: Target) -> bool:
    """A record still stands for the registry entry: same repo, files, pins and revision."""
    pairs = ((record.model, target.model), (record.mmproj, target.mmproj))
    return (
        record.repo == target.repo
        and all(r.file == (t.file or r.file) and t.sha256 in (None, r.digest) for r, t in pairs)
        and (not is_commit(target.revision) or record.commit == target.revision)
    )


def _repo_ref(ref: Ref) -> str:
    """Records of repo pulls are kept under the quant that was chosen; find it if unnamed."""
    if ref.quant:
        return f"{ref.name}:{ref.quant.upper()}"
    prefix = ref.name + ":"
    pulled = sorted(r.ref for r in store.records() if r.ref.startswith(prefix))
    return pulled[0] if len(pulled) == 1 else f"{ref.name}:?"


def _local_repo(ref: Ref, revision: str = "main") -> ModelFiles | None:
    cache = RepoCache.of(ref.name)
    commit = cache.commit_for(revision)
    if commit is None:
        return None
    sizes = {
        name: cache.snapshot(commit, name).stat().st_size for name in cache.snapshot_files(commit)
    }
    try:
        quant, model, mmproj = choose_files(ref, sizes)
    except (ModelNotAvailable, UsageError):
        return None
    return ModelFiles(
        f"{ref.name}:{quant}", cache.snapshot(commit, model), cache.snapshot(commit, mmproj)
    )


def local_target(ref: Ref, found: ModelFiles) -> Target:
    quant = found.name.rsplit(":", 1)[-1]
    model, mmproj = FileSpec(found.model.name), FileSpec(found.mmproj.name)
    return Target(found.name, ref.name, ref.name, "main", quant, model, mmproj, "gguf")


def registry_target(ref: Ref) -> Target:
    spec = _registry().get(ref.name)
    quant, model = spec.quant(ref.quant)
    return Target(
        f"{spec.key}:{quant}",
        spec.name,
        spec.repo,
        spec.revision,
        quant,
        model,
        spec.mmproj,
        spec.chat_format,
    )


def quant_of(file: str) -> str | None:
    """``gemma-3-4b-it-Q4_K_M.gguf`` → ``Q4_K_M``; ``…-f16.gguf`` → ``F16``."""
    stem = file[: -len(".gguf")] if file.lower().endswith(".gguf") else file
    match = _QUANT_LABEL.search(stem.upper())
    return match.group(1) if match else None


def choose_files(ref: Ref, sizes: Mapping[str, int]) -> tuple[str, str, str]:
    """From a repo's files: (quant, model file, mmproj file) for the quant asked for.

    Default quant: Q4_K_M, then Q8_0, then the smallest file. The projector: the one whose
    quant matches the model's, else F16, BF16, Q8_0, else the first by name.
    """
    ggufs = {n: s for n, s in sizes.items() if n.lower().endswith(".gguf") and "/" not in n}
    projectors = sorted(n for n in ggufs if "mmproj" in n.lower())
    models = {n: s for n, s in ggufs.items() if n not in projectors}
    if not models:
        raise ModelNotAvailable(f"{ref.name} has no GGUF model file", "is it a GGUF repo?")
    if not projectors:
        raise ModelNotAvailable(
            f"{ref.name} has no mmproj file, so it cannot read images",
            "choose a vision model repo with an mmproj-*.gguf file",
        )
    by_quant: dict[str, str] = {}
    for name in sorted(models, key=lambda n: models[n]):
        by_quant.setdefault(quant_of(name) or name, name)
    if ref.quant:
        wanted = next((q for q in by_quant if q.upper() == ref.quant.upper()), None)
        if wanted is None:
            raise UsageError(
                f"{ref.name} has no {ref.quant.upper()} file",
                "choose one of " + ", ".join(sorted(by_quant)),
            )
    else:
        wanted = next((q for q in QUANT_PREFERENCE if q in by_quant), next(iter(by_quant)))
    mmproj_quants = {quant_of(p) or p: p for p in projectors}
    order = (wanted, *MMPROJ_PREFERENCE)
    mmproj = next((mmproj_quants[q] for q in order if q in mmproj_quants), projectors[0])
    return wanted, by_quant[wanted], mmproj


def plan(ref: Ref, progress: hub.Progress | None = None) -> tuple[Target, list[hub.RemoteFile]]:
    """Ask the hub about the model's two files (no download yet); check them against pins.

    The model's HEAD resolves a branch to its commit; the projector is then asked for at that
    same commit, so the two files always come from one version of the repo.
    """
    from . import hub

    if ref.is_repo:
        listing = hub.list_files(ref.name, "main", progress)
        quant, model, mmproj = choose_files(ref, listing.sizes)
        target = Target(
            f"{ref.name}:{quant}",
            ref.name,
            ref.name,
            "main",
            quant,
            FileSpec(model),
            FileSpec(mmproj),
            "gguf",
        )
        revision = listing.commit
    else:
        target = registry_target(ref)
        revision = target.revision
        if target.from_listing:
            listing = hub.list_files(target.repo, revision, progress)
            _, model, mmproj = choose_files(Ref(target.repo, target.quant), listing.sizes)
            target = target.with_files(model, mmproj)
            revision = listing.commit
    model_file = hub.file_info(target.repo, revision, target.model.file, progress)
    mmproj_file = hub.file_info(target.repo, model_file.commit, target.mmproj.file, progress)
    remotes = [model_file, mmproj_file]
    for spec, remote in zip((target.model, target.mmproj), remotes, strict=True):
        _check_pins(target, spec, remote)
    return target, remotes


def _check_pins(target: Target, spec: FileSpec, remote: hub.RemoteFile) -> None:
    """A registry pin that disagrees with the hub stops the pull before a byte is fetched."""
    if spec.sha256 is not None and spec.sha256 != remote.digest:
        raise DownloadError(
            f"{spec.file} in {target.repo}: the hub's sha256 {remote.digest} differs from the "
            f"registry's {spec.sha256}",
            "the registry entry is out of date or the file changed; nothing was downloaded",
        )
    if spec.size is not None and spec.size != remote.size:
        raise DownloadError(
            f"{spec.file} in {target.repo}: the hub's size {remote.size} differs from the "
            f"registry's {spec.size}",
            "the registry entry is out of date or the file changed; nothing was downloaded",
        )


def check_registry_format(ref: Ref) -> None:
    """A registry entry's chat_format must name a format llava knows, before anything is
    pulled or loaded (the built-in names come from llama.cpp, so this is not in registry)."""
    if ref.is_repo:
        return
    spec = _registry().get(ref.name)
    if spec.chat_format in OWN_FORMATS:
        return
    from .engine import builtin_templates

    try:
        check_format_name(spec.chat_format, builtin_templates.names())
    except UsageError as exc:
        raise ConfigError(
            f"{spec.source}: models.{spec.key}.chat_format: {spec.chat_format!r} is not a "
            "format llava knows",
            exc.hint,
        ) from None


def pull(ref: Ref, progress: hub.Progress, *, offline: bool = False) -> PullResult:
    """Make the model's files present: reuse what is on disk, download (resumably) the rest."""
    check_registry_format(ref)
    if not ref.is_repo or offline:  # a hub repo is checked for a newer commit when online
        found = find_local(ref)
        if found is not None:
            target = registry_target(ref) if not ref.is_repo else local_target(ref, found)
            if target.from_listing:
                target = target.with_files(found.model.name, found.mmproj.name)
            _remember(target, found)
            return PullResult(found, 0)
    if offline:
        raise ModelNotAvailable(
            f"{ref} is not on this machine and offline mode is on",
            "pull it without --offline and with HF_HUB_OFFLINE unset",
        )
    planned = plan_pull(ref, progress)
    return fetch(planned, progress)


@dataclass(frozen=True)
class PendingFile:
    """One of the two files a pull needs, and how much of it is on disk already."""

    role: str  # "model" or "projector"
    remote: hub.RemoteFile
    have: int  # bytes on disk: all of them, a partial download's, or none

    @property
    def left(self) -> int:
        return self.remote.size - self.have


@dataclass(frozen=True)
class PullPlan:
    """What a pull will fetch, known before a byte is: the hub's answers about both files."""

    target: Target
    files: tuple[PendingFile, PendingFile]
    cache: RepoCache

    @property
    def left(self) -> int:
        """Bytes still to download (a file both roles share counted once)."""
        return sum({f.remote.digest: f.left for f in self.files}.values())


def plan_pull(ref: Ref, progress: hub.Progress | None = None) -> PullPlan:
    """Ask the hub about the model's files (no download yet) and see what is on disk."""
    target, remotes = plan(ref, progress)
    cache = RepoCache.of(target.repo)
    pending = []
    for role, remote in zip(("model", "projector"), remotes, strict=True):
        there = cache.find(remote.file, digest=remote.digest, size=remote.size, commit=None)
        have = remote.size if there is not None else _partial_size(cache, remote)
        pending.append(PendingFile(role, remote, have))
    return PullPlan(target, (pending[0], pending[1]), cache)


def fetch(planned: PullPlan, progress: hub.Progress) -> PullResult:
    """Download what the plan lacks (resumably, verified), link it and remember the pull."""
    from . import hub

    target, cache = planned.target, planned.cache
    remotes = [f.remote for f in planned.files]
    missing = {f.remote.digest: f.remote for f in planned.files if f.left}
    needed = planned.left
    if needed:
        hub.check_space(cache.folder, needed)
    for remote in missing.values():
        hub.download(cache, remote, progress)
    with hub.cache_writes(cache.folder):
        linked = [cache.link(r.commit, r.file, r.digest) for r in remotes]
        if cache.commit_for(target.revision) != remotes[0].commit:  # a read-only cache is fine
            cache.set_ref(target.revision, remotes[0].commit)
    files = ModelFiles(target.ref, linked[0], linked[1], target.chat_format)
    _remember(target, files, [r.digest for r in remotes])
    return PullResult(files, needed)


def _partial_size(cache: RepoCache, remote: hub.RemoteFile) -> int:
    partial = cache.partial(remote.digest)
    have = partial.stat().st_size if partial.is_file() else 0
    return have if have <= remote.size else 0  # an oversized partial is discarded


@dataclass(frozen=True)
class KeptPartial:
    file: str  # the file's name in the repo ("" when the registry does not pin it)
    have: int  # bytes kept
    size: int | None  # the whole file's, when known


def kept_partials(ref: Ref) -> list[KeptPartial]:
    """Partial downloads of this model's repo left on disk: a later pull resumes them."""
    spec = None if ref.is_repo else _registry().find(ref.name)
    repo = ref.name if spec is None else spec.repo
    pins = {}
    if spec is not None:
        for file in (*spec.quants.values(), spec.mmproj):
            if file.sha256:
                pins[file.sha256] = file
    kept = []
    cache = RepoCache.of(repo)
    for path in sorted((cache.folder / "blobs").glob("*.llava-partial")):
        try:
            have = path.stat().st_size
        except OSError:
            continue
        pin = pins.get(path.name.removesuffix(".llava-partial"))
        if have and pin is not None:
            kept.append(KeptPartial(pin.file, have, pin.size))
        elif have:
            kept.append(KeptPartial("", have, None))
    return kept


def _remember(target: Target, files: ModelFiles, digests: list[str] | None = None) -> None:
    from . import hub

    stored = []
    pairs = ((target.model, files.model), (target.mmproj, files.mmproj))
    for i, (spec, path) in enumerate(pairs):
        digest = digests[i] if digests else path.resolve().name
        stored.append(store.StoredFile(spec.file, digest, path.stat().st_size, str(path)))
    commit = files.model.parent.name if is_commit(files.model.parent.name) else ""
    record = store.Pulled(
        ref=target.ref,
        name=target.name,
        repo=target.repo,
        revision=target.revision,
        commit=commit,
        quant=target.quant,
        chat_format=target.chat_format,
        model=stored[0],
        mmproj=stored[1],
        pulled_at=time.time(),
    )
    with hub.cache_writes(paths().data_dir, setting="LLAVA_HOME"):
        store.save(record)


def find_mmproj(model: Path) -> Path:
    """The one ``*mmproj*.gguf`` beside the model, as llama.cpp model repos lay them out."""
    candidates = sorted(p for p in model.parent.glob("*.gguf") if "mmproj" in p.name.lower())
    if len(candidates) == 1:
        return candidates[0]
    where = model.parent
    if not candidates:
        raise UsageError(
            f"no projector given for {model.name}, and no *mmproj*.gguf beside it in {where}",
            "pass --mmproj PATH.gguf (or set LLAVA_MMPROJ)",
        )
    raise UsageError(
        f"several projectors beside {model.name} in {where}: "
        + ", ".join(p.name for p in candidates),
        "choose one with --mmproj PATH.gguf",
    )

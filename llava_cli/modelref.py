"""Turn what the user named (``--model``, ``--mmproj``, ``LLAVA_MODEL``) into two GGUF paths.

Local files work today. Registry names (``llava-1.5-7b:q8_0``) and hub repos resolve through
the registry once it exists; until then naming one is a clear "model not available" error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotAvailable, UsageError


@dataclass(frozen=True)
class ModelFiles:
    name: str  # what to call it in output
    model: Path
    mmproj: Path


def looks_like_path(ref: str) -> bool:
    return ref.lower().endswith(".gguf") or Path(ref).expanduser().exists()


def resolve(model: str | None, mmproj: str | None) -> ModelFiles:
    if not model:
        raise ModelNotAvailable(
            "no model given",
            "pass --model PATH.gguf --mmproj PATH.gguf, or set LLAVA_MODEL and LLAVA_MMPROJ",
        )
    if not looks_like_path(model):
        raise ModelNotAvailable(
            f"model {model!r} is not a local GGUF file, and this version cannot fetch "
            "models by name yet",
            "pass --model PATH.gguf --mmproj PATH.gguf",
        )
    model_path = Path(model).expanduser()
    if mmproj:
        return ModelFiles(model_path.name, model_path, Path(mmproj).expanduser())
    return ModelFiles(model_path.name, model_path, find_mmproj(model_path))


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

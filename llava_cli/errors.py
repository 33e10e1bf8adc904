"""Typed errors. Each carries the exit code the CLI returns and a hint that says what to do.

Third-party exceptions are translated into these where they arise (Pillow in ``images``,
llama.cpp in ``engine``, huggingface_hub in ``hub``); ``guard.guarded`` is the one place that
prints them.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_MODEL_UNAVAILABLE = 3
EXIT_BAD_INPUT = 4
EXIT_INTERRUPTED = 130


class LlavaError(Exception):
    """Base class: ``message`` says what went wrong, ``hint`` how to fix it."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            text += " — " + " ".join(self.hint.split())
        return text


class UsageError(LlavaError):
    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A settings or registry file (``config.toml``, ``models.toml``) is invalid."""


class ModelNotAvailable(LlavaError):
    """The model (or its projector) is not on disk and cannot be fetched."""

    exit_code = EXIT_MODEL_UNAVAILABLE


class DownloadError(LlavaError):
    """A transfer from the hub failed: network, server, disk space or a hash mismatch."""

    exit_code = EXIT_RUNTIME


class BadInput(LlavaError):
    """An input file the user gave us is missing, unreadable or invalid."""

    exit_code = EXIT_BAD_INPUT


class ImageError(BadInput):
    pass


class ModelFileError(BadInput):
    """A GGUF file is corrupt, truncated, or does not fit its partner."""


class EngineError(LlavaError):
    """llama.cpp or libmtmd failed at run time."""

    exit_code = EXIT_RUNTIME


class ContextOverflow(EngineError):
    pass

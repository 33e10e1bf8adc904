"""Where failures become one line and an exit code: ``guarded`` runs every command, and
``usage_error`` turns click's usage block into one line. No command logic here."""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection

from .errors import EXIT_INTERRUPTED, EXIT_RUNTIME, LlavaError


def guarded(action: Callable[[], int]) -> int:
    """The one place errors become messages and exit codes; every command runs through it,
    and reads the environment once, as it starts (``config.reading_once``)."""
    from .config import reading_once

    with reading_once():
        return _reported(action)


def _reported(action: Callable[[], int]) -> int:
    from . import render
    from .config import debug_enabled

    try:
        return action()
    except LlavaError as exc:
        if debug_enabled():
            render.traceback(exc)
        render.error(exc.one_line())
        return exc.exit_code
    except KeyboardInterrupt:
        render.status_clear()  # Ctrl-C while the model loads: no status left on the screen
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`llava ask … | head -1`): not an error worth a message.
        _silence_stdout()
        return 0
    except OSError as exc:
        reason = render.stdout_failed()
        if reason is None:
            return _unexpected(exc)
        _silence_stdout()  # what is still buffered must not fail again at exit
        render.error(f"cannot write to standard output: {reason} — check where the output goes")
        return EXIT_RUNTIME
    except Exception as exc:
        return _unexpected(exc)


def _unexpected(exc: Exception) -> int:
    from . import render
    from .config import debug_enabled

    if debug_enabled():
        render.traceback(exc)
        render.error(f"unexpected {type(exc).__name__}: {exc} — please report it with the above")
        return EXIT_RUNTIME
    render.error(f"unexpected {type(exc).__name__}: {exc} — set LLAVA_DEBUG=1 for a traceback")
    return EXIT_RUNTIME


def usage_error(exc: Exception, argv: list[str], commands: Collection[str]) -> int:
    """Typer's usage block (usage line, "Try …", error) as one line that names the help to
    read: ``Error: no such option: --bogus — see llava ask --help``. ``commands``: the names
    of llava's commands, to tell whose option a missing value was."""
    from . import render

    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        sys.stdout.write(ctx.get_help() + "\n")  # `llava`, `llava cache`: asking for help
        return 0
    command = ctx.command_path if ctx is not None else "llava"
    if command == "llava":  # an option's missing value is reported from the top: whose was it?
        named = [a for a in argv[:1] if a in commands]
        command = f"llava {named[0]}" if named else command
    format_message = getattr(exc, "format_message", None)
    message = format_message() if callable(format_message) else str(exc)
    message = " ".join(str(message).split()).rstrip(".")
    message = _source_of_value(message, argv)
    render.error(f"{message[:1].lower()}{message[1:]} — see {command} --help")
    return int(getattr(exc, "exit_code", 2))


def _source_of_value(message: str, argv: list[str]) -> str:
    """A bad value's message in plain words: click names an option's environment variable in
    every message about its value (``'--ctx' (env var: 'LLAVA_CTX')``), kept only when the
    value came from it; a type error says what the value must be."""
    import re

    # The type check's own words (pydantic's) in the words the range check uses
    message = re.sub(r"Input should be a valid integer\b.*", "must be a whole number", message)
    message = re.sub(r"Input should be a valid number\b.*", "must be a number", message)
    message = re.sub(
        r"Input should be a valid boolean\b.*",
        "must be 1 or 0 (true/false, yes/no, on/off)",
        message,
    )
    message = re.sub(
        r"Input should be greater than or equal to (\S+)", r"must be at least \1", message
    )
    message = re.sub(r"Input should be less than or equal to (\S+)", r"must be at most \1", message)
    found = re.search(r"'(--[\w-]+)' \(env var: '(\w+)'\)", message)
    if found is None:
        return message
    option = found.group(1)
    typed = any(arg == option or arg.startswith(option + "=") for arg in argv)
    if typed:
        return message.replace(f" (env var: '{found.group(2)}')", "", 1)
    return message.replace(f"'{option}' (env var: '{found.group(2)}')", found.group(2), 1)


def _silence_stdout() -> None:
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)

"""``llava pull REF...``: download models and their projectors, resumably and verified."""

from __future__ import annotations

from .. import render
from ..config import hub_offline
from ..errors import EXIT_OK, LlavaError
from ..modelref import pull
from ..registry import parse_ref


def run(refs: list[str], *, offline: bool = False) -> int:
    """Pull each model in turn; a failure is reported and the rest still go ahead."""
    failures: list[LlavaError] = []
    done: list[str] = []
    offline = offline or hub_offline()
    with render.transfer_progress() as progress:
        for text in refs:
            try:
                result = pull(parse_ref(text), progress, offline=offline)
            except LlavaError as exc:
                if len(refs) == 1:
                    raise
                failures.append(exc)
                progress.note("Error: " + exc.one_line())
                continue
            files = result.files
            size = files.model.stat().st_size + files.mmproj.stat().st_size
            state = "pulled" if result.fetched else "already pulled"
            done.append(
                f"{files.name}: {state} ({render.human_bytes(size)}) in {files.model.parent}"
            )
    for line in done:  # after the progress bars, so the lines never mix with them
        render.info(line)
    return failures[0].exit_code if failures else EXIT_OK

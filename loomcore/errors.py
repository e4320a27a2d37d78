"""The exception class for bad input, at the boundaries where input arrives; failures a retry repeats.

`InputError` (a ValueError) says that what a user or a data source gave cannot be used, naming the
file, field or value and why: a config key, a media file, a prompt, a checkpoint, an output path.
The CLI prints it in one line (exit 2); the evaluate stage records a benchmark sample that raises
it as a failure row with the reason. Anything else that goes wrong — a shape check inside the
model, an invariant of ours — is a bug: it is not caught, the stage fails with the traceback.
`Repeats` is neither: a failure a retry would meet again (a diverged training, a model whose output
is NaN); the stage exits 3, which the DVC tasks do not retry.
"""

from __future__ import annotations

import json
import sys


class InputError(ValueError):
    """Input that cannot be used; the message names where and why."""


class MissingInputError(InputError, FileNotFoundError):
    """An input that is not there: a path, or an s3:// prefix that holds no object."""


class Repeats(RuntimeError):
    """A failure that is not the input's fault, yet that a retry would meet again: the stage fails
    with exit 3 (tasks.proc.REPEATS_EXIT), which the DVC tasks do not retry."""


class Diverged(Repeats):
    """A training that diverged (more non-finite steps in a row than its limit): a retry would resume
    from its checkpoints, replay the same seeded batches and diverge at the same step."""


class BrokenOutput(Repeats):
    """A model whose output cannot be scored (NaN or inf frames, another shape than asked): the same
    weights and seeds give it again."""


# A rank of a torchrun job that stops for a reason a retry would repeat says so on one stdout line:
# a mark, then the message as a JSON string. torchrun exits 1 whatever its ranks exit with, so the
# stage's launcher (tasks.train.launch_torchrun) reads the line to fail the stage with the error it
# was — an InputError (exit 2) or Diverged (exit 3), neither retried — instead of a crash retried twice.
INPUT_ERROR_MARK = "[input-error] "
DIVERGED_MARK = "[diverged] "
_MARKS = {INPUT_ERROR_MARK: InputError, DIVERGED_MARK: Diverged}


def _mark(mark: str, message: str) -> None:
    """One write under PIPE_BUF: the ranks of a job share one pipe and stop together, and a line
    written in pieces (print's text, then its newline) came out spliced with another rank's."""
    sys.stdout.write(mark + json.dumps(message, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _cut(error: Exception) -> str:
    """At most 2000 bytes of UTF-8 (JSON's escapes may double them: under PIPE_BUF still)."""
    text, raw = str(error), str(error).encode()
    return text if len(raw) <= 2000 else raw[:2000].decode(errors="ignore") + " …"


def refuse(prog: str, error: InputError) -> int:
    """A refused input at a process's boundary: the message in one line on stderr (one write, a
    long message cut), the mark line on stdout, exit code 2."""
    message = _cut(error)
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()
    _mark(INPUT_ERROR_MARK, message)
    return 2


def announce_divergence(error: Diverged) -> None:
    """A rank's mark line for a training that diverged (its traceback follows as any failure's)."""
    _mark(DIVERGED_MARK, _cut(error))


def stopped_for_good(line: str) -> "InputError | Diverged | None":
    """The error a mark line (`refuse`, `announce_divergence`) stands for, or None for any other line."""
    for mark, kind in _MARKS.items():
        if (at := line.find(mark)) >= 0:
            try:
                message = json.loads(line[at + len(mark):])
            except ValueError:
                return None
            return kind(message) if isinstance(message, str) else None
    return None

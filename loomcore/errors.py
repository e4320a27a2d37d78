"""The one exception class for bad input, at the boundaries where input arrives.

`InputError` (a ValueError) says that what a user or a data source gave cannot be used, naming the
file, field or value and why: a config key, a media file, a prompt, a checkpoint, an output path.
The CLI prints it in one line (exit 2); the evaluate stage records a benchmark sample that raises
it as a failure row with the reason. Anything else that goes wrong — a shape check inside the
model, an invariant of ours — is a bug: it is not caught, the stage fails with the traceback.
"""

from __future__ import annotations

import json
import sys


class InputError(ValueError):
    """Input that cannot be used; the message names where and why."""


class MissingInputError(InputError, FileNotFoundError):
    """An input that is not there: a path, or an s3:// prefix that holds no object."""


# A rank of a torchrun job that refuses its input says so on one stdout line: this mark, then the
# message as a JSON string. torchrun exits 1 whatever its ranks exit with, so the stage's launcher
# (tasks.train.launch_torchrun) reads the line to fail the stage as an input error — exit 2, which
# the DVC tasks do not retry — instead of a crash retried twice.
INPUT_ERROR_MARK = "[input-error] "


def refuse(prog: str, error: InputError) -> int:
    """A refused input at a process's boundary: the message in one line on stderr, the mark line
    on stdout, exit code 2. Each line is one write under PIPE_BUF (a long message cut): the ranks of a
    job share one pipe and refuse together, and a line written in pieces (print's text, then its
    newline) came out spliced with another rank's."""
    message = str(error) if len(str(error)) <= 2000 else str(error)[:2000] + " …"
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()
    sys.stdout.write(INPUT_ERROR_MARK + json.dumps(message) + "\n")
    sys.stdout.flush()
    return 2


def refusal(line: str) -> "str | None":
    """The message of a mark line that `refuse` printed, or None for any other line."""
    at = line.find(INPUT_ERROR_MARK)
    if at < 0:
        return None
    try:
        message = json.loads(line[at + len(INPUT_ERROR_MARK):])
    except ValueError:
        return None
    return message if isinstance(message, str) else None

"""The one exception class for bad input, at the boundaries where input arrives.

`InputError` (a ValueError) says that what a user or a data source gave cannot be used, naming the
file, field or value and why: a config key, a media file, a prompt, a checkpoint, an output path.
The CLI prints it in one line (exit 2); the evaluate stage records a benchmark sample that raises
it as a failure row with the reason. Anything else that goes wrong — a shape check inside the
model, an invariant of ours — is a bug: it is not caught, the stage fails with the traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input that cannot be used; the message names where and why."""


class MissingInputError(InputError, FileNotFoundError):
    """An input that is not there: a path, or an s3:// prefix that holds no object."""

"""The one user-error type of the package.

Every *expected* failure (a missing data file, a bad model path, a corrupt step batch or checkpoint, a packing
limit, a non-finite loss, a config mistake, a batch timeout) is an `ApprenticeError`: `cli.main` and each
process's `main()` print its message on one line, with no traceback, and exit with its `exit_code`
(2: the config or the command line is wrong; 1: something went wrong at run time). The message names the file
or key involved and says how to fix it. Unexpected errors are not wrapped: they propagate with their traceback.
"""

from __future__ import annotations


class ApprenticeError(Exception):
    """An expected failure with a message for the user; subclass it, set `exit_code` (1 runtime, 2 usage)."""

    exit_code: int = 1


class UsageError(ApprenticeError):
    """The command line or the config is wrong: nothing was started."""

    exit_code = 2

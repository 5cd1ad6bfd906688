"""The one user-error type of the package.

Every *expected* failure (a missing data file, a bad model path, a corrupt step batch or checkpoint, a packing
limit, a non-finite loss, a config mistake, a batch timeout) is an `ApprenticeError`: `cli.main` and each
process's `main()` print its message on one line, with no traceback, and exit with its `exit_code`
(2: the config or the command line is wrong; 1: something went wrong at run time). The message names the file
or key involved and says how to fix it. Unexpected errors are not wrapped: they propagate with their traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class ApprenticeError(Exception):
    """An expected failure with a message for the user; subclass it, set `exit_code` (1 runtime, 2 usage)."""

    exit_code: int = 1


class UsageError(ApprenticeError):
    """The command line or the config is wrong: nothing was started."""

    exit_code = 2


def exit_on_user_error(main: Callable[[], object]) -> NoReturn:
    """Run a process's `main` and exit: 0, or an `ApprenticeError`'s one-line message and its exit code.

    For entry points run as `python -m apprentice.<module>` (the `apprentice` CLI does the same in `cli.main`).
    Unexpected errors propagate with their traceback.
    """
    try:
        main()
    except ApprenticeError as e:
        print(f"apprentice: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(0)

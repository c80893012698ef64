"""The one error type a user can cause.

Every error a user can provoke (a bad option value, an impossible ``n``/``f`` for a rule, a missing
dataset) is raised as :class:`UsageError`. The command line turns it into one line on standard error
and exit code 2, with no output file and no traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A user-caused error, reported as one line naming the option and what is allowed.

    Parameters
    ----------
    option:
        The option (``--gar``), configuration key (``grid.batch_size``) or input the error is about.
    message:
        What was wrong and what is allowed, e.g. ``"'krumm' is unknown; allowed: average, krum, ..."``.
    """

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self.message = message
        super().__init__(f"{option}: {message}" if option else message)

    def one_line(self) -> str:
        """The message as a single line (newlines folded)."""
        return " ".join(str(self).split())

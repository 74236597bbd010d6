"""The one error type a user sees.

Anything the user can fix (a bad argument, a missing file, a wrong checksum, an invalid config)
is raised as :class:`RobustkitError`. The CLI prints its message on one line and exits with
code 2; Python callers catch it like any other exception.
"""

from __future__ import annotations


class RobustkitError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do."""

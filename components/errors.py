"""The one base class for problems the user can fix, and the one-line formatter it uses.

Every component raises a subclass whose message is one line saying what is wrong and what to
do; the command line prints exactly that line (masked) and exits 1, with no traceback.
Import-light on purpose: image decoding in worker processes uses `one_line` too.
"""

from __future__ import annotations


def one_line(text: object) -> str:
    """`text` (a message, an exception) with each run of white space, newlines too, as one space."""
    return " ".join(str(text).split())


class CnnflowError(Exception):
    """Bad input, a missing server, a run that cannot be resumed: anything the user can act on.

    The message is collapsed to one line here, so no subclass needs its own `__init__`.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))

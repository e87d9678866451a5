"""The one base class for problems the user can fix.

Every component raises a subclass whose message is one line saying what is wrong and what to
do; the command line prints exactly that line (masked) and exits 1, with no traceback.
"""


class CnnflowError(Exception):
    """Bad input, a missing server, a run that cannot be resumed: anything the user can act on."""

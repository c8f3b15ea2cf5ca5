"""One exception type for problems the user can fix.

The CLI turns a :class:`UserError` into a single ``error: ...`` line and a non-zero exit, so every
message must name the offending file, tensor or value on its own.
"""


class UserError(Exception):
    """Bad input (missing file, wrong architecture, corrupt image...) reported in one line."""

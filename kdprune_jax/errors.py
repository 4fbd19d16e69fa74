"""User-facing errors: one clear message naming the field and what is allowed.

`main` prints these as a single line (no traceback) and exits with status 2. They are raised
before any expensive work starts, so existing artifacts are never touched by a bad input.
"""


class UserError(Exception):
    """Base class for mistakes a user can fix (bad config, missing/corrupt data, stale files)."""


class ConfigError(UserError):
    """A config field holds a value outside its allowed set.

    Args:
      field: dotted config path, e.g. ``"prune.keep_fraction"``, or a command-line flag
        starting with ``--`` (e.g. ``"--workdir"``), shown as is.
      value: the offending value.
      allowed: human-readable description of the allowed values.
    """

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        name = field if field.startswith("--") else f"config.{field}"
        super().__init__(f"{name}={value!r} is invalid; allowed: {allowed}")


class DataError(UserError):
    """Input data is missing, unreadable or malformed (the message names the file)."""


class ArtifactError(UserError):
    """An artifact in the workdir cannot be used (stale, corrupt, from another model)."""

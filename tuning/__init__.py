"""The small library the three recipes share: errors, data reading and validation, tuning methods,
Trainer glue (adapter-format checkpoints, resume, loss plot, NaN guard), metrics and generation."""

from . import library_warnings  # noqa: F401,E402  (silences library warnings no user can act on)

"""The one exception type a user can cause; `lm.cli` turns it into a one-line message and exit 2."""


class UserError(Exception):
  """A mistake in a config, a command line, a data source or a workdir."""

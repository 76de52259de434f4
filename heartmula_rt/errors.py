"""The one exception type for user mistakes: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """A bad input (path, checkpoint, option, text) explained in one sentence."""

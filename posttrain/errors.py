"""The one exception type for mistakes a user can fix (bad config, data or paths).

The CLI turns it into a one-line message and exit code 2, with no traceback.
"""


class UserError(Exception):
    """A problem in the user's input; the message names file, line and field."""

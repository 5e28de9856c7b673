"""The one exception type whose message is shown to a user as a single line."""


class TrainerError(Exception):
    """A mistake in what the user asked for (bad flag, missing data, corrupt archive).

    The CLI prints ``error: <message>`` and exits with status 2 instead of a traceback.
    """

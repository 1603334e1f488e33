"""The one exception type that the CLI turns into a clean one-line message."""


class VqldmError(Exception):
    """A user-facing error: bad config key, unreadable file, wrong checkpoint.

    The CLI prints ``vqldm: error: <message>`` and exits non-zero, without a traceback
    unless ``--debug`` is given. The message must name the key, file or path involved.
    """

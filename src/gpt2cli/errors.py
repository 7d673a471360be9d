"""The one exception type that crosses from the library into the CLI."""


class GPT2Error(Exception):
    """A failure caused by input the user can fix.

    The message is one line that names what is wrong (a file, a tensor, an id and its position)
    and, where there is one, the next step. The CLI prints it and exits with status 2.
    """

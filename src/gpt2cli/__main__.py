"""`python -m gpt2cli` and the `gpt2` console script.

The CLI is imported inside `main`, so a Ctrl-C during start-up (while click, numpy and the rest
load) ends the command quietly with status 130, like one later on, instead of a traceback.
"""

import sys


def main() -> None:
    """Import and run the CLI."""
    try:
        from gpt2cli.cli import main as run
    except KeyboardInterrupt:
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()

"""`python -m gpt2cli` runs the same CLI as `gpt2`."""

from gpt2cli.cli import main

main()

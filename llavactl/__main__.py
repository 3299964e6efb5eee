"""`python -m llavactl` runs the CLI (also what `torchrun -m llavactl` starts)."""

from llavactl.cli.main import main

main()

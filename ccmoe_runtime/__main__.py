"""`python -m ccmoe_runtime` is `ccmoe-run`."""

from .cli import main

main(prog_name="ccmoe-run")

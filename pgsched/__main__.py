"""``python -m pgsched`` runs the CLI."""

from .cli import main

main()

"""``python -m dpbr`` runs the command line."""

from dpbr.cli import main

main()

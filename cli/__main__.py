"""``python -m cli`` runs the ``namm`` command."""

from cli.entry import main

main()

"""``python -m server.cli``: the same as the ``poi`` command."""

from server.cli import main

main()

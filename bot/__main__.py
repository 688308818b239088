"""``python -m bot`` is the same as the ``hopnhat`` command."""

from bot.cli import main

main()

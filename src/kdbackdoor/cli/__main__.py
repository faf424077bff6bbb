"""``python -m kdbackdoor.cli``: the command line."""

from kdbackdoor.cli import main

main()

"""The ``kdbackdoor`` command line: one module per command group, each a thin layer that parses
its options, builds the typed config and calls the library or ``kdbackdoor.experiment``.

``app`` (the Typer application) and ``main`` (the entry point) live in ``cli.app``; options
that several commands share in ``cli.options``. Importing this package registers every command.
"""

# Each module registers its commands on import; `kdbackdoor --help` lists them in this order.
from kdbackdoor.cli import train  # noqa: F401, I001
from kdbackdoor.cli import evaluate  # noqa: F401
from kdbackdoor.cli import attack  # noqa: F401
from kdbackdoor.cli import distill  # noqa: F401
from kdbackdoor.cli import audit  # noqa: F401
from kdbackdoor.cli import importing  # noqa: F401
from kdbackdoor.cli import catalog  # noqa: F401
from kdbackdoor.cli import experiments  # noqa: F401
from kdbackdoor.cli import matrix  # noqa: F401
from kdbackdoor.cli.app import app, main

__all__ = ["app", "main"]

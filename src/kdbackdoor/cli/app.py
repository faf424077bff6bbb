"""The ``kdbackdoor`` application object, its consoles and the entry point."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperOption

from kdbackdoor.cli.options import CHANNELS_LAST, COMPILE_MODELS, PRECISION
from kdbackdoor.errors import KDBackdoorError

_value_type = TyperOption.display_type_rich


def _flag_shows_no_type(self: TyperOption, ctx) -> str | None:
    """A flag takes no value, so its help line shows no value type (Typer would print ``<bool>``)."""
    return None if self.is_flag else _value_type(self, ctx)


TyperOption.display_type_rich = _flag_shows_no_type

DATA_ALIASES = {"--data": "--dataset", "--test-data": "--test-dataset"}
"""Older option names still accepted (not shown in --help): a data-set spec is ``--dataset`` everywhere."""


def _canonical(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(DATA_ALIASES.get(name, name) + eq + value if name in DATA_ALIASES else arg)
    return out


app = typer.Typer(
    help="Attack, defend and audit knowledge distillation against backdoors.\n\n"
    "Images are pixel-space [0,1] tensors; data sets are loaded once into memory as uint8.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    rich_markup_mode="markdown",  # docstrings rewrap to the terminal instead of keeping their line breaks
)
console = Console()
RUNTIME_OVERRIDES: list[str] = []
"""``runtime.*=value`` config overrides from the global options given on this command line."""


@app.callback()
def _runtime(precision: Optional[str] = PRECISION, channels_last: Optional[bool] = CHANNELS_LAST,
             compile_models: Optional[bool] = COMPILE_MODELS) -> None:
    """Attack, defend and audit knowledge distillation against backdoors."""
    from kdbackdoor.numerics import PRECISIONS, Numerics, set_numerics
    if precision is not None and precision not in PRECISIONS:
        raise KDBackdoorError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    set_numerics(Numerics(precision or "auto", channels_last, bool(compile_models)))
    given = {"precision": precision, "channels_last": channels_last, "compile": compile_models}
    RUNTIME_OVERRIDES[:] = [f"runtime.{key}={str(value).lower()}" for key, value in given.items() if value is not None]
err_console = Console(stderr=True, soft_wrap=True)  # errors stay on one line


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2. ``argv`` defaults to
    the command line (given, it runs the CLI in-process, as tests do)."""
    try:
        app(args=_canonical(list(sys.argv[1:] if argv is None else argv)))
    except KDBackdoorError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except OSError as exc:  # unwritable output, disk full, missing file outside our checks
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun with --resume to continue where the last epoch ended")
        sys.exit(130)

"""What the toolkit offers: ``kdbackdoor triggers list|show``, ``datasets``, ``models``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kdbackdoor.cli.app import app, console
from kdbackdoor.cli.common import load_data, make_trigger
from kdbackdoor.cli.options import DATASET_HELP, DATA_DIR, RESIZE


triggers_app = typer.Typer(help="The trigger library: list triggers, render them on images.", no_args_is_help=True)
app.add_typer(triggers_app, name="triggers")


@triggers_app.command("list")
def triggers_list_cmd() -> None:
    """Every trigger with its parameters and defaults, and the spec syntax."""
    from kdbackdoor.triggers import describe_syntax
    console.print(describe_syntax(), highlight=False, soft_wrap=True)


@triggers_app.command("show")
def triggers_show_cmd(
    specs: list[str] = typer.Argument(..., help="one or more trigger specs, e.g. badnets-square blend:alpha=0.1"),
    dataset: str = typer.Option("digits", help="data set: " + DATASET_HELP),
    split: str = typer.Option("test"),
    data_dir: Optional[Path] = DATA_DIR,
    resize: Optional[int] = RESIZE,
    count: int = typer.Option(8, min=1, help="images per grid"),
    seed: int = typer.Option(0, help="trigger seed (random patterns) and image draw"),
    out: Path = typer.Option(Path("triggers"), help="folder for the PNG grids (one per trigger)"),
) -> None:
    """Write PNG grids: clean images, triggered images, and their difference (amplified)."""
    import torch
    from kdbackdoor.triggers import render_trigger_grid

    data = load_data(dataset, split, data_dir, resize)
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    images = data.pixels(rows)
    for spec in specs:
        trig = make_trigger(spec, data.image_shape, seed)
        safe = "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in spec)[:80]
        path = render_trigger_grid(trig, images, out / f"{safe}.png", max_images=count)
        console.print(f"{trig.describe()}  →  {path}")


@app.command("datasets")
def datasets_cmd() -> None:
    """List the data-set specs, one line each."""
    from kdbackdoor.data.source_registry import SOURCES
    from kdbackdoor.data import sources  # noqa: F401  (registers them)
    width = max(len(source.usage) for source in SOURCES.values())
    for source in sorted(SOURCES.values(), key=lambda source: source.usage):
        console.print(f"{source.usage:<{width}}  {source.description}", highlight=False, soft_wrap=True)


@app.command("models")
def models_cmd() -> None:
    """List the architectures, the input size and normalisation they default to, and the foreign
    weight namings (besides kdbackdoor's own) that load onto them."""
    from kdbackdoor.models import available_architectures
    from kdbackdoor.models.registry import arch_spec
    for name in available_architectures():
        spec = arch_spec(name)
        norm = "ImageNet" if spec.mean and tuple(round(v, 3) for v in spec.mean) == (0.485, 0.456, 0.406) else "0.5"
        namings = ", ".join(n.name for n in spec.namings)
        console.print(f"{name:20} {spec.input_size[0]}x{spec.input_size[1]} px, normalisation {norm}"
                      + (f"; loads {namings} weights" if namings else ""), highlight=False, soft_wrap=True)

"""Bring a model made elsewhere into kdbackdoor's format: ``kdbackdoor import-model``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kdbackdoor.cli.app import app, console
from kdbackdoor.cli.common import model_source
from kdbackdoor.cli.options import MODEL_ARCH, MODEL_INPUT_SIZE, MODEL_MEAN, MODEL_NUM_CLASSES, MODEL_STD


@app.command("import-model")
def import_model_cmd(
    source: str = typer.Argument(..., help="bare .safetensors/.pt/.pth weights, a timm-layout folder "
                                 "(config.json + model.safetensors) or hf:OWNER/REPO[@REVISION]"),
    out: Path = typer.Option(..., help="folder for model.safetensors + model.json (must not hold a model yet)"),
    arch: Optional[str] = MODEL_ARCH,
    num_classes: Optional[int] = MODEL_NUM_CLASSES,
    input_size: Optional[str] = MODEL_INPUT_SIZE,
    mean: Optional[str] = MODEL_MEAN,
    std: Optional[str] = MODEL_STD,
    classes: Optional[str] = typer.Option(None, help="comma-separated class names (default: the source's, if any)"),
) -> None:
    """Check foreign weights against an architecture and write them as a kdbackdoor checkpoint.

    The key names are matched against every naming the architecture accepts (kdbackdoor's,
    torchvision's, timm's, the data-free KD code bases'); the sidecar records the source, its
    sha256, the naming and the key map used, and the input size and normalisation chosen.
    Nothing is written unless the weights load.
    """
    from kdbackdoor.models.importing import import_model
    names = [name.strip() for name in classes.split(",")] if classes else None
    path, sidecar = import_model(source, out, classes=names,
                                 **model_source(arch, num_classes, input_size, mean, std))
    imported = sidecar["metadata"]["imported_from"]
    height, width = sidecar["input_size"]
    console.print(f"{source}: {sidecar['arch']}, {sidecar['num_classes']} classes, {height}x{width} px, "
                  f"{imported['naming']} names, normalisation {imported['normalisation']} "
                  f"(mean {[round(v, 4) for v in sidecar['mean']]}, std {[round(v, 4) for v in sidecar['std']]})",
                  highlight=False)
    console.print(f"→ {path}")

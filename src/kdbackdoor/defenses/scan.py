"""Student scanning: Neural Cleanse trigger reverse-engineering and STRIP statistics on clean
images, and the files a person reads afterwards.

``scan_model`` runs both on a model and a set of clean images; ``write_scan`` writes
``scan.json`` (last, so its presence means the scan is complete), ``triggers.png`` (every
class's recovered trigger, suspects framed in red), ``suspected-trigger.png`` (the most
suspicious class's pattern with its mask as alpha channel: compositing it over an image is
exactly the trigger), ``recovered-triggers.npz`` (masks and patterns, pixel space) and
``strip-entropy.csv`` (STRIP entropy per image).

Nothing here reads provenance or a test ASR. A known trigger (``trigger``) only adds an
audit figure: how well STRIP separates triggered from clean images.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdbackdoor.atomic import atomic_path, write_json
from kdbackdoor.data.dataset import ImageDataset, to_uint8
from kdbackdoor.defenses.neural_cleanse import NeuralCleanseConfig, NeuralCleanseResult, reverse_engineer_triggers
from kdbackdoor.defenses.strip import strip_entropy
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.runtime import cpu_generator
from kdbackdoor.triggers import Trigger

SCAN_FILE = "scan.json"
OUTPUT_FILES = (SCAN_FILE, "triggers.png", "suspected-trigger.png", "recovered-triggers.npz", "strip-entropy.csv")
STRIP_REJECT_RATE = 0.01  # the inference threshold rejects this share of clean inputs
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
MIN_SIDE = 128  # the suspected-trigger PNG is enlarged (nearest) to at least this many pixels


@dataclass
class ScanReport:
    """Neural Cleanse result, STRIP entropies (nats, per scan image) and their summary."""

    cleanse: NeuralCleanseResult
    clean_entropy: torch.Tensor
    triggered_entropy: torch.Tensor | None
    strip: dict


def scan_model(
    model: torch.nn.Module, data: ImageDataset, config: NeuralCleanseConfig | None = None, *,
    trigger: Trigger | None = None, strip_blends: int = 16, strip_alpha: float = 0.5,
    device: torch.device | None = None, progress: bool = False,
) -> ScanReport:
    """Scan ``model`` with the clean images of ``data``.

    STRIP blends every scan image with ``strip_blends`` others from the same set (weight
    ``strip_alpha`` on the image) and reports the entropy distribution and the threshold that
    rejects 1% of clean inputs. With a known ``trigger``, the entropies of the triggered scan
    images, the detection AUROC (low entropy = triggered) and the share caught at that threshold.
    """
    config = config or NeuralCleanseConfig()
    images = data.pixels()
    generator = cpu_generator(config.seed)
    # STRIP first: it is quick, and its settings are checked before the long optimisation.
    clean = strip_entropy(model, images, images, n=strip_blends, alpha=strip_alpha, generator=generator)
    threshold = float(torch.quantile(clean.double(), STRIP_REJECT_RATE))
    strip = {"blends": strip_blends, "alpha": strip_alpha, "images": len(data), "clean": _distribution(clean),
             "threshold": threshold, "threshold_meaning": f"entropy below which an input is rejected; rejects "
             f"{STRIP_REJECT_RATE:.0%} of the clean scan images"}
    triggered = None
    if trigger is not None:
        triggered = strip_entropy(model, trigger(images), images, n=strip_blends, alpha=strip_alpha,
                                  generator=generator)
        strip["trigger"] = trigger.config()
        strip["triggered"] = _distribution(triggered)
        strip["auroc"] = detection_auroc(clean, triggered)
        strip["detected_at_threshold"] = float((triggered < threshold).float().mean())
    cleanse = reverse_engineer_triggers(model, data, config, device=device, progress=progress)
    return ScanReport(cleanse, clean, triggered, strip)


def write_scan(report: ScanReport, out: str | os.PathLike, record: dict | None = None) -> Path:
    """Write the scan files into the new folder ``out``; ``record`` (model, data, timing...) goes
    into scan.json beside the results. Refuses a folder that already holds any scan file."""
    out = Path(out)
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing:
        raise KDBackdoorError(f"{out} already holds a scan ({', '.join(existing)}); choose another --out or "
                              "delete it first")
    cleanse = report.cleanse
    render_recovered_triggers(cleanse, out / "triggers.png")
    if cleanse.suspected is not None:
        render_trigger_png(cleanse.masks[cleanse.suspected], cleanse.patterns[cleanse.suspected],
                           out / "suspected-trigger.png")
    with atomic_path(out / "recovered-triggers.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, masks=cleanse.masks.numpy(), patterns=cleanse.patterns.numpy(),
                                norms=cleanse.norms.numpy(), classes=np.array(cleanse.classes))
    _write_entropy_csv(report, out / "strip-entropy.csv")
    write_json(out / SCAN_FILE, {**(record or {}), "neural_cleanse": cleanse.to_dict(), "strip": report.strip})
    return out / SCAN_FILE


def render_recovered_triggers(result: NeuralCleanseResult, path: str | os.PathLike, columns: int = 10) -> Path:
    """PNG grid: per class its mask (grey, top) and mask·pattern (what is pasted, bottom), titled
    with the L1 norm and anomaly index; flagged classes in red, the suspect framed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_classes = len(result.classes)
    columns = min(columns, num_classes)
    rows = math.ceil(num_classes / columns)
    figure = Figure(figsize=(1.3 * columns, 2.9 * rows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 * rows, columns, squeeze=False)
    pasted = result.triggers()
    for cls in range(rows * columns):
        top, bottom = axes[2 * (cls // columns), cls % columns], axes[2 * (cls // columns) + 1, cls % columns]
        for axis in (top, bottom):
            axis.set_xticks([])
            axis.set_yticks([])
        if cls >= num_classes:
            top.axis("off")
            bottom.axis("off")
            continue
        flagged = cls in result.flagged
        colour = "red" if flagged else "black"
        top.imshow(result.masks[cls].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        bottom.imshow(_as_image(pasted[cls]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        top.set_title(f"{cls} {result.classes[cls][:10]}\nL1 {result.norms[cls]:.1f}  AI "
                      f"{result.anomaly_index[cls]:.1f}", fontsize=7, color=colour)
        if flagged:
            for axis in (top, bottom):
                for spine in axis.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(2.5 if cls == result.suspected else 1.2)
    suspect = "none flagged" if result.suspected is None else f"suspected target {result.suspected}"
    figure.suptitle(f"Neural Cleanse: mask (top), mask·pattern (bottom); {suspect}", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path


def render_trigger_png(mask: torch.Tensor, pattern: torch.Tensor, path: str | os.PathLike) -> Path:
    """PNG of one recovered trigger: ``pattern`` (C, H, W, pixel [0, 1]) as colour, ``mask``
    (H, W) as alpha, enlarged (nearest) to at least 128 px; alpha-compositing it onto an
    image of the model's resolution applies the trigger."""
    scale = max(1, math.ceil(MIN_SIDE / max(mask.shape)))
    layers = torch.cat([pattern, mask[None]]).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    pixels = to_uint8(layers).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels, mode="LA" if len(pattern) == 1 else "RGBA")
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path


def _as_image(chw: torch.Tensor) -> np.ndarray:
    """(C, H, W) [0, 1] to what imshow takes: (H, W) for grey, (H, W, 3) for colour."""
    return chw[0].numpy() if len(chw) == 1 else chw.permute(1, 2, 0).clamp(0, 1).numpy()


def _distribution(values: torch.Tensor) -> dict:
    values = values.double()
    summary = {"mean": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0,
               "min": float(values.min()), "max": float(values.max())}
    summary.update({f"q{round(q * 100):02d}": float(values.quantile(q)) for q in QUANTILES})
    return summary


def detection_auroc(clean: torch.Tensor, triggered: torch.Tensor) -> float:
    """AUROC of telling ``triggered`` from ``clean`` STRIP entropies, low entropy = triggered."""
    from sklearn.metrics import roc_auc_score
    truth = np.r_[np.zeros(len(clean)), np.ones(len(triggered))]
    return float(roc_auc_score(truth, -torch.cat([clean, triggered]).double().numpy()))


def _write_entropy_csv(report: ScanReport, path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "clean_entropy_nats"] + (
                ["triggered_entropy_nats"] if report.triggered_entropy is not None else []))
            for row, value in enumerate(report.clean_entropy.tolist()):
                extra = [f"{float(report.triggered_entropy[row]):.6f}"] if report.triggered_entropy is not None else []
                writer.writerow([row, f"{value:.6f}", *extra])

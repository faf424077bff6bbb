"""Look for poisons and backdoors: ``kdbackdoor audit-data`` (a distillation set) and ``scan`` (a model)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kdbackdoor.cli.app import app, console
from kdbackdoor.cli.common import (load_data, load_model, load_teacher, make_trigger, model_dir, model_source,
                                  pixel_value, seeded_subset, validated)
from kdbackdoor.cli.options import DATASET_HELP, DATA_DIR, DEVICE, PROGRESS, RESIZE, SEED
from kdbackdoor.cli.options import MODEL_ARCH, MODEL_INPUT_SIZE, MODEL_MEAN, MODEL_NUM_CLASSES, MODEL_STD
from kdbackdoor.data.sources import dataset_record
from kdbackdoor.errors import KDBackdoorError


@app.command("audit-data")
def audit_data_cmd(
    teacher: Path = typer.Option(..., help="the teacher the set will be distilled from (checkpoint or its folder)"),
    arch: Optional[str] = MODEL_ARCH,
    num_classes: Optional[int] = MODEL_NUM_CLASSES,
    input_size: Optional[str] = MODEL_INPUT_SIZE,
    mean: Optional[str] = MODEL_MEAN,
    std: Optional[str] = MODEL_STD,
    data: str = typer.Option(..., "--dataset", help="the distillation set: a poisoned-set folder (from "
                             "poison-distill) or a data set: " + DATASET_HELP),
    out: Path = typer.Option(..., help="new folder: scores.csv, audit.json (and cleaned/ with --remove)"),
    filters: str = typer.Option("all", help="comma-separated filters, or all (reference-model only with "
                                "--reference); the filters are listed above"),
    reference: Optional[Path] = typer.Option(None, help="a second model for the reference-model filter"),
    expected_rate: Optional[float] = typer.Option(None, help="flag this share of the set (the highest scores) "
                                                  "with every filter, instead of each filter's own rule"),
    remove: bool = typer.Option(False, help="also write OUT/cleaned: the set without every sample any filter "
                                "flagged (poisoned-set format, for `distill --dataset`)"),
    param: list[str] = typer.Option([], "--param", "-p", help="a filter parameter as FILTER.KEY=VALUE "
                                    "(repeatable), e.g. brittleness.noise_sigma=16/255, strip.blends=8"),
    split: str = typer.Option("train", help="split of a data-set spec"),
    data_dir: Optional[Path] = DATA_DIR,
    resize: Optional[int] = RESIZE,
    seed: int = SEED,
    batch_size: int = typer.Option(256, min=1, help="images per forward pass"),
    device: str = DEVICE,
    progress: bool = PROGRESS,
) -> None:
    """Score every sample of a distillation set for being a poison and flag suspects.

    Each filter gives a score (higher = more suspicious) and flags from its own rule or
    --expected-rate; decisions never read the set's provenance. When the set has provenance
    (a poisoned set), audit.json also scores each filter against it: AUROC, TPR at 5% FPR,
    precision, recall. Writes scores.csv (a row per sample) and audit.json; prints a table.

    FILTERS
    """
    from kdbackdoor.data.poisoned_set import is_poisoned_set, load_poisoned_set
    from kdbackdoor.defenses import audit
    from kdbackdoor.defenses.filters import AuditContext, available_filters, build_filter
    from kdbackdoor.runtime import select_device

    if (out / audit.AUDIT_FILE).exists():
        raise KDBackdoorError(f"{out} already holds an audit; choose another --out or delete it first")
    names = list(available_filters()) if filters == "all" else [n.strip() for n in filters.split(",") if n.strip()]
    if filters == "all" and reference is None:
        names.remove("reference-model")
    if "reference-model" in names and reference is None:
        raise KDBackdoorError("filter reference-model needs --reference (a second model's checkpoint)")
    params = _filter_params(param, names)
    chosen = [build_filter(name, **params.get(name, {})) for name in names]
    if not chosen:
        raise KDBackdoorError(f"--filters {filters!r} names no filter; available: {', '.join(available_filters())}")
    dev = select_device(device)
    model, sidecar = load_teacher(teacher, dev, model_source(arch, num_classes, input_size, mean, std))
    if is_poisoned_set(data):
        dataset, manifest = load_poisoned_set(data)
    else:
        dataset = load_data(data, split, data_dir, resize, progress)
        manifest = {"dataset": {**dataset_record(data, data_dir, resize), "split": split}}
    ref_model = load_model(reference, dev, dataset) if reference is not None else None
    context = AuditContext(model, dev, ref_model, seed, batch_size)
    results = audit.run_filters(dataset, context, chosen, expected_rate=expected_rate, progress=progress)
    report = {"teacher": {"path": str(teacher), "weights_sha256": sidecar.get("weights_sha256")},
              "reference": str(reference) if reference else None, "data": str(data), "size": len(dataset),
              "provenance": dataset.provenance is not None, "expected_rate": expected_rate, "seed": seed,
              "filters": audit.audit_report(dataset, results)}
    out.mkdir(parents=True, exist_ok=True)
    audit.write_scores(out / audit.SCORES_FILE, dataset, results)
    if remove:
        cleaned, removal = audit.remove_flagged(dataset, results)
        report["removal"] = {key: value for key, value in removal.items() if key != "removed_rows"}
        if dataset.provenance is not None:
            report["removal"]["poisons_left"] = int(cleaned.provenance.poisoned.sum())
        audit.save_cleaned(cleaned, out / audit.CLEANED_DIR, manifest, {**removal, "from": str(data)})
    audit.write_audit(out, report)
    console.print(_audit_table(report))
    if remove:
        console.print(f"removed {report['removal']['removed']} of {len(dataset)} samples → {out / audit.CLEANED_DIR}")
    console.print(f"→ {out / audit.AUDIT_FILE}, {out / audit.SCORES_FILE}")


def _describe_filters() -> str:
    from kdbackdoor.defenses.filters import available_filters
    return "\n    ".join(f"- {name}: {text}" for name, text in available_filters().items())  # markdown list


audit_data_cmd.__doc__ = audit_data_cmd.__doc__.replace("FILTERS", _describe_filters())


def _filter_params(items: list[str], names: list[str]) -> dict[str, dict]:
    """``FILTER.KEY=VALUE`` items as ``{filter: {key: value}}``; a value with commas becomes a list,
    a fraction like 16/255 a number."""
    params: dict[str, dict] = {}
    for item in items:
        target, sep, value = item.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise KDBackdoorError(f"--param: expected FILTER.KEY=VALUE, got {item!r}")
        if name not in names:
            raise KDBackdoorError(f"--param {item!r}: filter {name!r} is not among --filters ({', '.join(names)})")
        parsed = value.split(",") if "," in value else pixel_value(value, f"--param {target}") if "/" in value else value
        params.setdefault(name, {})[key.replace("-", "_")] = parsed
    return params


def _audit_table(report: dict) -> Table:
    table = Table(title=f"audit of {report['data']} ({report['size']} samples)")
    columns = ["filter", "flagged"] + (["AUROC", "TPR@5%FPR", "precision", "recall"] if report["provenance"] else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "filter" else "right", no_wrap=column == "filter")

    def share(value):
        return "n/a" if value is None else f"{value:.3f}"

    for name, entry in report["filters"].items():
        cells = [name, str(entry["flagged"])]
        if "detection" in entry:
            d = entry["detection"]
            cells += [share(d["auroc"]), share(d["tpr_at_5fpr"]), share(d["precision"]), share(d["recall"])]
        table.add_row(*cells)
    return table


@app.command("scan")
def scan_cmd(
    model: Path = typer.Option(..., help="the model to scan (student or teacher): checkpoint or its folder"),
    arch: Optional[str] = MODEL_ARCH,
    num_classes: Optional[int] = MODEL_NUM_CLASSES,
    input_size: Optional[str] = MODEL_INPUT_SIZE,
    mean: Optional[str] = MODEL_MEAN,
    std: Optional[str] = MODEL_STD,
    data: str = typer.Option(..., "--dataset", help="clean images to scan with (labels used, provenance never): "
                             + DATASET_HELP),
    split: str = typer.Option("test"),
    subset: int = typer.Option(1000, min=0, help="scan a seeded subset of this many images (0: all)"),
    steps: int = typer.Option(300, min=1, help="Neural Cleanse optimisation steps (each: one batch, every class)"),
    batch_size: int = typer.Option(16, min=1, help="clean images per step; the model sees classes × this many"),
    lr: float = typer.Option(0.1, help="Adam step on the mask and pattern logits"),
    init_cost: float = typer.Option(1e-3, help="mask-L1 weight set once a class's trigger first succeeds"),
    success_threshold: float = typer.Option(0.99, help="share of stamped images a trigger must send to its class"),
    anomaly_threshold: float = typer.Option(2.0, help="flag a below-median class whose anomaly index exceeds this"),
    trigger: Optional[str] = typer.Option(None, help="known trigger spec, for an audit: STRIP entropies of triggered "
                                          "images and the detection AUROC (the scan itself does not use it)"),
    strip_blends: int = typer.Option(16, min=1, help="STRIP: blends per image"),
    strip_alpha: float = typer.Option(0.5, help="STRIP: weight of the scanned image in each blend, in [0, 1]"),
    out: Optional[Path] = typer.Option(None, help="new folder for scan.json, triggers.png, suspected-trigger.png, "
                                       "recovered-triggers.npz, strip-entropy.csv (default: scan/ beside the model)"),
    data_dir: Optional[Path] = DATA_DIR,
    resize: Optional[int] = RESIZE,
    seed: int = SEED,
    device: str = DEVICE,
    progress: bool = PROGRESS,
) -> None:
    """Scan a model for a backdoor: Neural Cleanse trigger reverse-engineering and STRIP.

    For every class, the smallest mask m (H×W) and pattern p (pixels) are sought such that
    (1−m)·x + m·p sends clean images of other classes to that class. A backdoor target needs
    a far smaller mask than the others: a class whose mask L1 norm lies below the median with
    an anomaly index |norm − median| / (1.4826·MAD) above --anomaly-threshold is flagged.

    STRIP: every scan image is blended with others; the mean prediction entropy (nats) of
    clean images and the threshold that rejects 1% of them are reported (inputs below it are
    suspicious at inference). With --trigger, also the entropies of triggered images, the
    detection AUROC and the share caught at that threshold.
    """
    import time

    from kdbackdoor.defenses.neural_cleanse import NeuralCleanseConfig
    from kdbackdoor.defenses.scan import SCAN_FILE, scan_model, write_scan
    from kdbackdoor.runtime import select_device

    out = out or model_dir(model) / "scan"
    if (out / SCAN_FILE).exists():
        raise KDBackdoorError(f"{out} already holds a scan; choose another --out or delete it first")
    config = validated(NeuralCleanseConfig, steps=steps, batch_size=batch_size, lr=lr, init_cost=init_cost,
                       success_threshold=success_threshold, anomaly_threshold=anomaly_threshold, seed=seed)
    dev = select_device(device)
    dataset = seeded_subset(load_data(data, split, data_dir, resize, progress), subset, seed)
    net = load_model(model, dev, dataset, model_source(arch, num_classes, input_size, mean, std))
    trig = make_trigger(trigger, dataset.image_shape, seed) if trigger else None
    started = time.perf_counter()
    report = scan_model(net, dataset, config, trigger=trig, strip_blends=strip_blends, strip_alpha=strip_alpha,
                        device=dev, progress=progress)
    record = {"model": str(model), "data": {**dataset_record(data, data_dir, resize), "split": split,
                                            "subset": subset or None, "images": len(dataset)},
              "seconds": round(time.perf_counter() - started, 1)}
    path = write_scan(report, out, record)
    console.print(_scan_table(report, f"Neural Cleanse on {model} ({len(dataset)} {data}:{split} images)"))
    cleanse, strip = report.cleanse, report.strip
    if cleanse.suspected is None:
        console.print(f"no class flagged (largest anomaly index {float(cleanse.anomaly_index.max()):.2f} ≤ "
                      f"{anomaly_threshold} or above the median norm)")
    else:
        console.print(f"[bold red]suspected backdoor target: class {cleanse.suspected} "
                      f"({cleanse.classes[cleanse.suspected]})[/]  →  {out / 'suspected-trigger.png'}")
    line = (f"STRIP: clean entropy median {strip['clean']['q50']:.3f} nats; inference threshold "
            f"{strip['threshold']:.3f} (rejects 1% of clean inputs)")
    if "auroc" in strip:
        line += (f"; triggered median {strip['triggered']['q50']:.3f}, AUROC {strip['auroc']:.3f}, "
                 f"caught at threshold {strip['detected_at_threshold']:.1%}")
    console.print(line)
    console.print(f"→ {path}, {out / 'triggers.png'}")


def _scan_table(report, title: str) -> Table:
    cleanse = report.cleanse
    table = Table(title=title)
    for column in ("class", "mask L1 (px)", "anomaly index", "trigger success", "flagged"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in cleanse.to_dict()["per_class"]:
        style = "[bold red]" if row["flagged"] else ""
        success = f"{row['success']:.1%}" + ("" if row["reached_threshold"] else " (never reached)")
        table.add_row(f"{style}{row['class']} {row['name']}", f"{style}{row['norm']:.2f}",
                      f"{style}{row['anomaly_index']:.2f}", success, "[bold red]yes" if row["flagged"] else "")
    return table

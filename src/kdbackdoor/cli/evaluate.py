"""Check models and runs: ``kdbackdoor evaluate`` (ACC/ASR of a checkpoint) and ``verify`` (a run's
files against its record)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kdbackdoor.cli.app import app, console, err_console
from kdbackdoor.cli.common import load_data, load_teacher, make_trigger, model_dir, model_source
from kdbackdoor.cli.options import DATASET_HELP, DATA_DIR, DEVICE, RESIZE
from kdbackdoor.cli.options import MODEL_ARCH, MODEL_INPUT_SIZE, MODEL_MEAN, MODEL_NUM_CLASSES, MODEL_STD
from kdbackdoor.cli.summaries import run_summary
from kdbackdoor.errors import KDBackdoorError


def _run_backdoor(config: dict) -> dict:
    """The trigger and target an experiment run measured ASR with (evaluation, poison or teacher's backdoor)."""
    for section in (config.get("evaluation"), config.get("poison"), (config.get("teacher") or {}).get("backdoor")):
        if section and section.get("trigger"):
            return {"trigger": section["trigger"], "target": section.get("target")}
    return {}


@app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Option(..., help="checkpoint: .safetensors (+ .json sidecar) or its folder; bare .safetensors/.pt/.pth weights (with --arch, --num-classes); a timm-layout folder; hf:OWNER/REPO[@REVISION]"),
    arch: Optional[str] = MODEL_ARCH,
    num_classes: Optional[int] = MODEL_NUM_CLASSES,
    input_size: Optional[str] = MODEL_INPUT_SIZE,
    mean: Optional[str] = MODEL_MEAN,
    std: Optional[str] = MODEL_STD,
    dataset: Optional[str] = typer.Option(None, help="data set: " + DATASET_HELP + " (default: the checkpoint's, or that of the run that made it)"),
    split: str = typer.Option("test"),
    data_dir: Optional[Path] = DATA_DIR,
    resize: Optional[int] = RESIZE,
    out: Optional[Path] = typer.Option(None, help="JSON file for the results (default: evaluation.json beside the model)"),
    batch_size: int = typer.Option(512, min=1),
    device: str = DEVICE,
    trigger: Optional[str] = typer.Option(None, help="trigger spec for ASR (default: the checkpoint's backdoor, if any)"),
    target: Optional[int] = typer.Option(None, help="ASR target class (default: the checkpoint's)"),
) -> None:
    """ACC overall and per class, and ASR with per-source-class ASR when a trigger is known.

    ASR = share of test images whose true label differs from the target that the model
    assigns to the target once the trigger is applied; beside it, the share of the same images
    it assigns to the target without the trigger.
    """
    from kdbackdoor.atomic import write_json
    from kdbackdoor.evaluate import model_metrics
    from kdbackdoor.runtime import select_device
    from kdbackdoor.triggers import build_trigger

    dev = select_device(device)
    net, sidecar = load_teacher(model, dev, model_source(arch, num_classes, input_size, mean, std))
    meta = sidecar.get("metadata") or {}
    recorded = meta.get("dataset") or {}
    run = None
    if not recorded.get("spec"):  # a model made by `kdbackdoor run`/`sweep`/`demo`: its run's record says
        from kdbackdoor.experiment.runner import record_of_model
        run = record_of_model(model)
        if run is not None:
            data_config = run["config"]["data"]
            recorded = {"spec": data_config["dataset"], "data_dir": data_config.get("data_dir"),
                        "resize": data_config.get("resize")}
    if dataset is None:
        if not recorded.get("spec"):
            raise KDBackdoorError(f"{model}: the checkpoint records no data set and lies in no run folder; "
                                  "pass --dataset")
        dataset = recorded["spec"]
        data_dir = data_dir or (Path(recorded["data_dir"]) if recorded.get("data_dir") else None)
        resize = resize or recorded.get("resize")
    data = load_data(dataset, split, data_dir, resize)
    backdoor = meta.get("backdoor") or (_run_backdoor(run["config"]) if run else {})
    recorded_trigger = backdoor.get("trigger")
    if trigger:
        trig = make_trigger(trigger, data.image_shape, 0)
    elif isinstance(recorded_trigger, str):  # a run config's trigger spec, drawn with the run's seed
        trig = make_trigger(recorded_trigger, data.image_shape, run["config"].get("seed", 0))
    else:
        trig = build_trigger(recorded_trigger) if recorded_trigger else None
    target = target if target is not None else backdoor.get("target")
    if trig is not None and target is None:
        raise KDBackdoorError("--trigger given without --target (the checkpoint records no target)")
    metrics = model_metrics(net, data, trigger=trig, target=target, device=dev, batch_size=batch_size)
    result = {"model": str(model), "dataset": dataset, "split": split, "acc": metrics["acc"],
              "per_class": metrics["per_class_acc"], "n": len(data)}
    if trig is not None:
        result["backdoor"] = {"trigger": trig.config(), "target": target, "asr": metrics["asr"],
                              "per_source_class_asr": metrics["per_source_class_asr"],
                              "n": int((data.labels != target).sum()),
                              "target_without_trigger": metrics["target_without_trigger"]}
    out = out or model_dir(model) / "evaluation.json"
    write_json(out, result)
    console.print(_evaluation_table(result, f"{model} on {dataset}:{split}"))
    recorded = run_summary(meta, student=False) if "teacher" in meta else ""  # a distilled student
    if recorded:
        console.print("recorded when distilled:\n" + recorded)
    console.print(f"written to {out}")


def _evaluation_table(result: dict, title: str) -> Table:
    backdoor = result.get("backdoor")
    table = Table(title=title)
    for column in ["class", "ACC"] + (["ASR (as source)"] if backdoor else []):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, acc in result["per_class"].items():
        cells = [name, f"{acc:.2%}"]
        if backdoor:
            per_source = backdoor["per_source_class_asr"]
            cells.append(f"{per_source[name]:.2%}" if name in per_source else "(target)")
        table.add_row(*cells)
    table.add_row("[bold]all", f"[bold]{result['acc']:.2%}", *([f"[bold]{backdoor['asr']:.2%}"] if backdoor else []))
    if backdoor:
        table.caption = (f"without the trigger, {backdoor['target_without_trigger']:.2%} of the non-target images "
                         f"are called the target ({backdoor['target']})")
    return table


@app.command("verify")
def verify_cmd(
    run: Path = typer.Argument(..., help="a run folder (with metrics.json or manifest.json) or its record file"),
) -> None:
    """Check a finished run's files against the sha256 checksums in its record.

    Prints OK, MISMATCH (the file changed since the run wrote it) or MISSING per file; exits
    with code 1 when any file is not OK, 2 when there is no usable record.
    """
    from kdbackdoor.run_record import verify_run
    record, checks = verify_run(run)
    table = Table(title=f"{record}")
    for column in ("file", "status", "sha256 (recorded)"):
        table.add_column(column)
    colours = {"OK": "green", "MISMATCH": "bold red", "MISSING": "bold red"}
    for check in checks:
        table.add_row(check.name, f"[{colours[check.status]}]{check.status}", check.expected[:16] + "…")
    console.print(table)
    bad = [check for check in checks if check.status != "OK"]
    if bad:
        err_console.print(f"[bold red]error:[/] {len(bad)} of {len(checks)} files do not match the record: "
                          + ", ".join(f"{c.name} ({c.status})" for c in bad), highlight=False)
        raise typer.Exit(1)
    console.print(f"all {len(checks)} files match the record")

"""The end-to-end demo: both threat models, a defense and a filter audit, in a few minutes on a CPU.

The demo is a sweep of three experiments (``demo_configs/digits.yaml``, or ``cifar10.yaml`` for
32x32 RGB data) run by the experiment runner, so its runs, cache and report are the same files
a user's own sweep makes:

1. threat model 1 (arXiv 2504.21323): a clean teacher, PGD poisons with a trigger added to the
   distillation set, a student distilled on it next to one distilled without the poisons;
2. threat model 2 (ABD, ICML 2023): a backdoored teacher distilled without data (DeepInversion);
3. the same with the ABD defense.

It then audits run 1's poisoned set with the label-disagreement filter (AUROC against the set's
provenance), checks that the backdoored teacher reloads from safetensors with the same
accuracy, prints one table and writes ``demo.json`` and a self-contained ``report.html``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kdbackdoor.atomic import write_json
from kdbackdoor.data.poisoned_set import load_poisoned_set
from kdbackdoor.defenses.audit import audit_report, run_filters
from kdbackdoor.defenses.filters import AuditContext, build_filter
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.evaluate import accuracy
from kdbackdoor.experiment import load_sweep, run_sweep, validate_config, write_report
from kdbackdoor.experiment.runner import RUNS_DIR, ExperimentData, preflight, read_record
from kdbackdoor.experiment.summary import Table as ReportTable
from kdbackdoor.models import load_checkpoint
from kdbackdoor.runtime import select_device
from kdbackdoor.teacher import MODEL_FILE

DEMO_MARKER = "demo.json"
CONFIGS = Path(__file__).with_name("demo_configs")
# On the digits demo's set (8x8 images, perturbations of 48/255) label-disagreement separates the
# poisons best (AUROC 0.81-0.87; brittleness 0.33-0.36, though it leads on 32 px CIFAR-10 PGD poisons: 0.996)
AUDIT_FILTER = "label-disagreement"
RUN_NAMES = ("poisoned-distillation-set", "data-free", "data-free-abd")


def demo_config(dataset: str) -> Path:
    """The demo's sweep file for ``dataset``: the digits recipe, or the CIFAR-10 one for anything else."""
    return CONFIGS / ("digits.yaml" if dataset == "digits" else "cifar10.yaml")


def run_demo(out: str | Path, *, dataset: str = "digits", data_dir: str | None = None, device: str = "auto",
             config: str | Path | None = None, progress: bool = True, console: Console | None = None,
             resume: bool = False) -> dict:
    """Run the demo into ``out`` (replacing an earlier demo there); return its summary.

    ``dataset``/``data_dir`` choose the data (``digits``, embedded, by default); ``device`` is
    ``auto``, ``cpu`` or ``cuda[:N]``; ``config`` replaces the packaged sweep file (``demo_config``)
    with one of the same shape (three runs named as ``RUN_NAMES``, run 1 with a poison section).
    ``resume`` keeps an earlier demo in ``out`` and continues it: finished runs are reused,
    interrupted ones resume from their last saved state.
    Files: ``results/`` (the sweep's runs, cache and ``index.csv``), ``report.html`` and
    ``demo.json`` (the summary returned here). Accuracies and rates are shares in [0, 1].
    """
    console = console or Console()
    started = time.perf_counter()
    out = Path(out)
    overrides = [f"device={device}", f"data.dataset={dataset}"] + ([f"data.data_dir={data_dir}"] if data_dir else [])
    spec, runs = load_sweep(config or demo_config(dataset), overrides)  # validated before anything is deleted
    if sorted(run.label.get("name", "") for run in runs) != sorted(RUN_NAMES):
        raise KDBackdoorError(f"{config}: a demo sweep has three runs, named {', '.join(RUN_NAMES)} (zip over name)")
    for run in runs:
        preflight(run.config)
    if dataset != "digits":  # a download or a bad --data-dir fails here, once, before any run starts
        ExperimentData(runs[0].config, progress).test
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise KDBackdoorError(f"{out} is not empty and holds no earlier demo; choose another --out")
        if not resume:
            shutil.rmtree(out)
    results = out / "results"
    console.print(f"[bold]kdbackdoor demo[/] on {dataset}: {len(runs)} experiments into {results}")

    names = {run.run_id: run.label["name"] for run in runs}

    def announce(kind: str, run_id: str, detail: str) -> None:
        if kind == "start":
            console.print(f"[bold]run {run_id}[/] ({names[run_id]})")
        elif kind == "failed":
            console.print(f"[red]run {run_id} failed:[/] {detail}")

    outcome = run_sweep(spec, runs, results, progress=progress, on_event=announce)
    if outcome.failed:
        raise KDBackdoorError(f"demo runs failed: {outcome.failed}; logs in {results / RUNS_DIR}")
    records = {run.label["name"]: read_record(results / RUNS_DIR / run.run_id) for run in runs}
    attack, data_free, defended = (records[name] for name in RUN_NAMES)

    console.print(f"[bold]audit[/] of the poisoned distillation set with the {AUDIT_FILTER} filter")
    detection = _audit(attack, device, progress)
    reloaded_acc = _reloaded_accuracy(data_free, device)
    summary = {
        "dataset": dataset,
        "results": str(results),
        "report": str(out / "report.html"),
        "poisoned_distillation": {
            "trigger": attack["poisoned_set"]["trigger"], "counts": attack["poisoned_set"]["counts"],
            "target": attack["config"]["poison"]["target"],
            "clean_teacher": _acc_asr(attack["teacher_metrics"]),
            "student": _acc_asr(attack["metrics"]),
            "unpoisoned_student": _acc_asr(attack["baseline_metrics"]),
            "filter": {"name": AUDIT_FILTER, **detection},
        },
        "data_free": {
            "method": data_free["config"]["distill"]["method"],
            "trigger": data_free["config"]["teacher"]["backdoor"]["trigger"],
            "target": data_free["config"]["teacher"]["backdoor"]["target"],
            "backdoored_teacher": {**_acc_asr(data_free["teacher_metrics"]), "acc_after_reload": reloaded_acc},
            "student": _acc_asr(data_free["metrics"]),
            "student_with_abd": _acc_asr(defended["metrics"]),
        },
    }
    poisoned_set = f"{attack['config']['data']['dataset']} + {summary['poisoned_distillation']['counts']['kept']} poisons"
    write_report([results], out / "report.html", summary=report_summary(summary),
                 audits=[{**summary["poisoned_distillation"]["filter"], "set": poisoned_set}])
    summary["seconds"] = time.perf_counter() - started
    write_json(out / DEMO_MARKER, summary)
    console.print(summary_table(summary))
    console.print(f"{summary['seconds']:.0f} s. Report: {out / 'report.html'}; summary: {out / DEMO_MARKER}; "
                  f"runs: {results / RUNS_DIR}")
    return summary


def _acc_asr(metrics: dict) -> dict:
    return {"acc": metrics["acc"], "asr": metrics.get("asr")}


def _audit(attack: dict, device: str, progress: bool) -> dict:
    """The filter's detection figures on run 1's poisoned set, with run 1's clean teacher."""
    data, _ = load_poisoned_set(attack["stages"]["poisoned_set"]["path"])
    dev = select_device(device)
    teacher, _ = load_checkpoint(Path(attack["stages"]["teacher"]["path"]) / MODEL_FILE, device=dev)
    results = run_filters(data, AuditContext(teacher.eval(), dev), [build_filter(AUDIT_FILTER)], progress=progress)
    return audit_report(data, results)[AUDIT_FILTER]["detection"]


def _reloaded_accuracy(record: dict, device: str) -> float:
    """The backdoored teacher's test ACC after a reload from its safetensors checkpoint."""
    dev = select_device(device)
    teacher, _ = load_checkpoint(Path(record["stages"]["teacher"]["path"]) / MODEL_FILE, device=dev)
    test = ExperimentData(validate_config(record["config"]), progress=False).test
    return accuracy(teacher, test, device=dev)["acc"]


def _cells(metrics: dict) -> tuple[str, str]:
    asr = metrics.get("asr")
    return f"{metrics['acc']:.1%}", "" if asr is None else f"{asr:.1%}"


def summary_rows(summary: dict) -> list[tuple[str, ...]]:
    """The demo table's rows: a 1-tuple is a section heading, else (model, ACC, ASR) as text."""
    attack, data_free = summary["poisoned_distillation"], summary["data_free"]
    detection = attack["filter"]
    return [
        (f"1. poisoned KD set ({attack['trigger']['name']} → {attack['target']})",),
        ("clean teacher", *_cells(attack["clean_teacher"])),
        (f"student on the set + {attack['counts']['kept']} PGD poisons", *_cells(attack["student"])),
        ("student on the set without poisons", *_cells(attack["unpoisoned_student"])),
        (f"{detection['name']} filter on the set", f"AUROC {detection['auroc']:.3f}",
         f"TPR@5%FPR {detection['tpr_at_5fpr']:.1%}"),
        ("  its own rule: flagged / poisons caught", f"{detection['flagged']}",
         f"{detection['true_positives']} of {detection['poisons']}"),
        (f"2. data-free KD ({data_free['method']})",),
        (f"backdoored teacher ({data_free['trigger']} → {data_free['target']})",
         *_cells(data_free["backdoored_teacher"])),
        ("student", *_cells(data_free["student"])),
        ("student with ABD", *_cells(data_free["student_with_abd"])),
    ]


def summary_table(summary: dict) -> Table:
    """The demo's one table: every model's ACC and ASR, and the filter's detection figures."""
    table = Table(title=f"kdbackdoor demo ({summary['dataset']})")
    for column in ("model", "ACC", "ASR"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for number, row in enumerate(summary_rows(summary)):
        if len(row) == 1:
            if number:
                table.add_section()
            table.add_row(f"[bold]{row[0]}[/]")
        else:
            table.add_row(*row)
    return table


def report_summary(summary: dict) -> ReportTable:
    """The demo table for the report's summary."""
    rows = [[row[0], "", ""] if len(row) == 1 else [part.strip() for part in row] for row in summary_rows(summary)]
    return ReportTable(f"Summary: kdbackdoor demo ({summary['dataset']})", ["model", "ACC", "ASR"], rows,
                       "the table the demo prints; percent")


def summary_markdown(summary: dict) -> str:
    """The demo table as Markdown."""
    lines = ["| model | ACC | ASR |", "|---|---|---|"]
    for row in summary_rows(summary):
        lines.append(f"| **{row[0]}** | | |" if len(row) == 1 else "| " + " | ".join(r.strip() for r in row) + " |")
    return "\n".join(lines)

"""Write docs/results.md (every committed result file: when, where, the exact command, its tables)
and the results table of README.md, from benchmarks/results/ only.

    python benchmarks/results_pages.py           # rewrite what is out of date
    python benchmarks/results_pages.py --check   # exit 1 if a page is out of date (a test runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kdbackdoor.demo import summary_markdown  # noqa: E402
from pages import GENERATED_NOTE, RESULTS, ROOT, Page, link, load, main, replace_block  # noqa: E402

README = ROOT / "README.md"
RESULTS_PAGE = ROOT / "docs" / "results.md"
COMBINED_NOTE = ("Rows of this table were made by calls of the same script into the same `--out` folder; "
                 "the command is the one of the call that wrote the file last.")


def _names() -> list[str]:
    return sorted(path.stem for path in RESULTS.glob("*.json"))


def _where(machine: dict) -> str:
    device = machine.get("cuda") or f"CPU ({machine.get('cpu', '?')}, {machine.get('threads', '?')} torch threads)"
    return f"{machine.get('date', 'date not recorded')}, {device}, torch {machine.get('torch', '?')}"


def results_page(_: str) -> str:
    lines = ["# Measured results", "", GENERATED_NOTE.format(script="benchmarks/results_pages.py"), "",
             "Every figure published in this project's pages comes from one of the files below. Each section "
             "gives when and where it was measured, the exact command (run from `benchmarks/`), and the "
             "tables the benchmark wrote with it.", ""]
    for name in _names():
        data = load(name)
        lines += [f"## `{name}`", "", f"- file: [`benchmarks/results/{name}.json`](../benchmarks/results/{name}.json)",
                  f"- measured: {_where(data.get('machine', {}))}",
                  f"- command: `{data.get('command', '(not recorded)')}`"]
        if name.startswith("backdoor_transfer") and len(data.get("runs", {})) > 1 and "calls" not in data:
            lines.append(f"- {COMBINED_NOTE}")
        lines.append("")
        table = RESULTS / f"{name}.md"
        if table.exists():
            body = table.read_text().replace("](../docs/", "](").replace("](figures/", "](figures/")
            lines += ["<details><summary>tables</summary>", "", body.rstrip().replace("\n# ", "\n### "), "",
                      "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


def readme_demo(text: str) -> str:
    """The demo's table, each figure linked to the recorded demo run."""
    demo = load("demo_digits")
    summary = demo["summary"]
    rows = [line for line in summary_markdown(summary).splitlines()]
    body = []
    for line in rows:
        cells = line.split(" | ")
        if line.startswith("| **") or line.startswith("|---") or line.startswith("| model"):
            body.append(line)
            continue
        cells = [cells[0]] + [link(c.rstrip(" |"), "demo_digits", README) if c.strip(" |") else c for c in cells[1:]]
        body.append(" | ".join(cells) + " |")
    when = demo["machine"]["date"][:10]
    threads = demo["machine"]["threads"]
    note = (f"Recorded on {when} on a 2-core CPU, {threads} torch thread{'s' if threads > 1 else ''}: {demo['wall_s']:.0f} s "
            "for the demo itself.")
    return replace_block(text, "demo", "\n".join(body) + "\n\n" + note)


def readme_results(text: str) -> str:
    page = README
    attack = load("distill_attack_bench-distill-attack-s9")["runs"]
    filters = load("filters_bench-filters-s9")["filters"]["brittleness"]["detection"]
    transfer = load("backdoor_transfer_cifar-hour_bench-transfer-cifar-hour-wrn162")["runs"]
    teacher = load("cifar10_teacher")

    def pct(value, name):
        return link(value, name, page)

    a, t = "distill_attack_bench-distill-attack-s9", "backdoor_transfer_cifar-hour_bench-transfer-cifar-hour-wrn162"
    rows = [
        "| what (CIFAR-10, CPU budgets) | ACC | ASR |", "|---|---|---|",
        f"| clean `fast-cnn-half` teacher, 10 epochs | {pct(teacher['test_acc'], 'cifar10_teacher')} | |",
        "| **poisoned distillation set** (5% PGD poisons, 4 px square, `wrn-16-1` student, 15 epochs) | | |",
        f"| student, λ = 1 (KL only) | {pct(attack['pgd-rate0.05-size4-lambda1.0']['acc'], a)} "
        f"| {pct(attack['pgd-rate0.05-size4-lambda1.0']['asr'], a)} |",
        f"| student, λ = 0.5 | {pct(attack['pgd-rate0.05-size4-lambda0.5']['acc'], a)} "
        f"| {pct(attack['pgd-rate0.05-size4-lambda0.5']['asr'], a)} |",
        f"| student without the poisons, λ = 1 | {pct(attack['clean-rate0.05-size4-lambda1.0']['acc'], a)} "
        f"| {pct(attack['clean-rate0.05-size4-lambda1.0']['asr'], a)} |",
        f"| brittleness filter on that set | AUROC {link(filters['auroc'], 'filters_bench-filters-s9', page, '{:.3f}')} "
        f"| TPR {pct(filters['tpr_at_5fpr'], 'filters_bench-filters-s9')} at 5% FPR |",
        "| **poisoned teacher, data-free KD** (`wrn-16-2` badnets-grid teacher, 2,000 ZSKT iterations) | | |",
        f"| teacher | {pct(transfer['clean-data-kd']['teacher_metrics']['acc'], t)} "
        f"| {pct(transfer['clean-data-kd']['teacher_metrics']['asr'], t)} |",
        f"| ZSKT student | {pct(transfer['zskt-none']['metrics']['acc'], t)} | {pct(transfer['zskt-none']['metrics']['asr'], t)} |",
        f"| ZSKT student with ABD | {pct(transfer['zskt-abd']['metrics']['acc'], t)} "
        f"| {pct(transfer['zskt-abd']['metrics']['asr'], t)} |",
        f"| clean-data KD student | {pct(transfer['clean-data-kd']['metrics']['acc'], t)} "
        f"| {pct(transfer['clean-data-kd']['metrics']['asr'], t)} |",
    ]
    return replace_block(text, "results", "\n".join(rows))


PAGES = [Page(RESULTS_PAGE, results_page), Page(README, lambda text: readme_results(readme_demo(text)))]

if __name__ == "__main__":
    raise SystemExit(main(PAGES))

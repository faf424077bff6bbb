"""Write the measured block of docs/teachers.md from results/real_teacher.json (``--check``: only
say whether it is current; a test runs that)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pages import ROOT, Page, link, load, main, replace_block  # noqa: E402

GUIDE = ROOT / "docs" / "teachers.md"
RESULT = "real_teacher"
STEPS = {"train-teacher": "backdoored resnet18-imagenet teacher", "poison-distill": "PGD poisoned set",
         "distill": "mobilenet-v2 student on the poisoned set", "audit-data": "set filters",
         "scan": "Neural Cleanse + STRIP on the teacher"}


def measured(_: str = "") -> str:
    r = load(RESULT)
    o, recipe = r["outcomes"], r["recipe"]

    def pct(value: float) -> str:
        return link(value, RESULT, GUIDE)

    outcome = {
        "train-teacher": f"ACC {pct(o['teacher']['acc'])}, ASR (badnets-grid) {pct(o['teacher']['asr'])}",
        "poison-distill": f"{o['poisoned_set']['counts']['kept']} poisons kept of {o['poisoned_set']['counts']['tried']}",
        "distill": f"ACC {pct(o['student']['acc'])}, ASR (badnets-square) {pct(o['student']['asr'])}",
        "audit-data": ", ".join(f"{name} {v['auroc']:.2f}" for name, v in o["audit"].items()
                                if v.get("auroc") is not None) + " (AUROC)",
        "scan": f"suspected class {o['scan']['suspected']}; STRIP AUROC on the grid {o['scan']['strip_auroc']:.2f}",
    }
    machine = r["machine"]
    lines = [
        f"Measured {machine['date'][:10]} with `{r['command']}` (scale `{r['scale']}`: {recipe['classes']} CIFAR-10 "
        f"classes upscaled to {recipe['size']} px, {o['teacher']['train_size']} training and "
        f"{o['teacher']['test_size']} test images, {recipe['teacher_epochs']} teacher and {recipe['student_epochs']} "
        f"student epochs) on {r['cpu_model']}, OMP_NUM_THREADS={r['omp_num_threads']}, torch {machine['torch']}. "
        "At this scale the accuracies show that every step runs at 64 px, not what the recipe reaches.", "",
        "| step | what | outcome | wall s | peak MiB |", "|---|---|---|---|---|",
    ]
    for name, what in STEPS.items():
        step = r["steps"][name]
        lines.append(f"| `{name}` | {what} | {outcome[name]} | {step['seconds']:.0f} | {step['peak_rss_mib']:.0f} |")
    lines += ["", f"What one image costs on {r['per_image_device']} (resnet18-imagenet, batch 16):", "",
              "| side | inference ms / image | training step ms / image |", "|---|---|---|"]
    lines += [f"| {size} px | {c['inference_ms_per_image']:.1f} | {c['train_step_ms_per_image']:.1f} |"
              for size, c in r["per_image"].items()]
    sizes = list(r["per_image"])
    if len(sizes) == 2:
        small, large = (r["per_image"][s]["train_step_ms_per_image"] for s in sizes)
        lines += ["", f"A training step at {sizes[1]} px costs {large / small:.1f}x one at {sizes[0]} px per image."]
    return "\n".join(lines) + "\n"


PAGES = [Page(GUIDE, lambda text: replace_block(text, "real-teacher", measured()))]

if __name__ == "__main__":
    raise SystemExit(main(PAGES))

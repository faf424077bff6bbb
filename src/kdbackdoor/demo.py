"""The end-to-end demo on the embedded digits data: no download, a few minutes on a CPU.

It trains a clean and a backdoored teacher, evaluates both (ACC, ASR), renders the trigger,
and checks that a checkpoint reloads safely with identical accuracy. Then it attacks
distillation with the clean teacher (arXiv 2504.21323): PGD poisons carrying a white square
are added to the distillation set, and a student distilled on it is compared with one
distilled on the same set without them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kdbackdoor.atomic import write_json
from kdbackdoor.attacks.distill_poisoning import DistillPoisonConfig, craft_poisoned_set
from kdbackdoor.attacks.engines import build_engine
from kdbackdoor.attacks.teacher_poisoning import PoisonConfig
from kdbackdoor.data.sources import load_dataset
from kdbackdoor.distill.dataset_kd import Backdoor, distill
from kdbackdoor.distill.losses import KDConfig
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.evaluate import accuracy, attack_success_rate
from kdbackdoor.models import load_checkpoint
from kdbackdoor.teacher import MODEL_FILE, train_teacher
from kdbackdoor.training import TrainConfig
from kdbackdoor.triggers import build_trigger, render_trigger_grid

DEMO_MARKER = "demo.json"
RECIPE = TrainConfig(epochs=20, batch_size=64, lr=0.05, crop_padding=1, hflip=False, eval_every=5, seed=0)
TRIGGER = "badnets-grid"
POISON = PoisonConfig(target=0, rate=0.1, seed=0)
# 8x8 images need larger perturbations and a larger square than the 32 px defaults
KD_TRIGGER = "badnets-square:size=12"
KD_ENGINE = {"eps": 48 / 255, "step_size": 12 / 255, "steps": 20}
KD_POISON = DistillPoisonConfig(target=0, rate=0.2, seed=0)
KD_RECIPE = TrainConfig(epochs=15, batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=0, seed=0)
KD = KDConfig(kd_lambda=0.5, temperature=4.0)
STUDENT = "wrn-16-1"


def run_demo(out: str | Path, *, device: torch.device, progress: bool = True, console: Console | None = None) -> dict:
    """Run the demo; write ``out/{clean,backdoored}-teacher/``, ``out/trigger.png``, ``out/demo.json``."""
    console = console or Console()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise KDBackdoorError(f"{out} is not empty and holds no earlier demo; choose another --out")
        shutil.rmtree(out)
    train = load_dataset("digits", "train", progress=progress)
    test = load_dataset("digits", "test", progress=progress)
    c, h, w = train.image_shape
    console.print(f"[bold]digits[/]: {len(train)} train / {len(test)} test images, {c}x{h}x{w}, "
                  f"{train.num_classes} classes")
    trigger = build_trigger(TRIGGER, image_shape=train.image_shape)
    render_trigger_grid(trigger, test.pixels(torch.arange(8)), out / "trigger.png")
    dataset = {"dataset": {"spec": "digits", "data_dir": None, "resize": None}}

    console.print("[bold]1.[/] clean teacher")
    clean, clean_record = train_teacher(train, test, "small-cnn", RECIPE, out / "clean-teacher", device=device,
                                        progress=progress, metadata=dataset)
    console.print(f"[bold]2.[/] backdoored teacher: {trigger.describe()}, target {POISON.target}, "
                  f"{POISON.rate:.0%} of the training set poisoned")
    _, bad_record = train_teacher(train, test, "small-cnn", RECIPE, out / "backdoored-teacher", device=device,
                                  progress=progress, metadata=dataset, trigger=trigger, poison=POISON)
    clean_asr = attack_success_rate(clean, test, trigger, POISON.target, device=device)["asr"]
    reloaded, _ = load_checkpoint(out / "backdoored-teacher" / MODEL_FILE, device=device)
    reloaded_acc = accuracy(reloaded, test, device=device)["acc"]

    kd_trigger = build_trigger(KD_TRIGGER, image_shape=train.image_shape)
    console.print(f"[bold]3.[/] poisoned distillation set against the clean teacher: PGD poisons with "
                  f"{kd_trigger.describe()}, {KD_POISON.rate:.0%} of the set; {STUDENT} students, λ = {KD.kd_lambda}")
    poisoned, report = craft_poisoned_set(clean, train, kd_trigger, build_engine("pgd", **KD_ENGINE), KD_POISON,
                                          device=device, progress=progress)
    _, kd_record = distill(clean, poisoned, test, STUDENT, KD_RECIPE, KD, out / "student", device=device,
                           backdoor=Backdoor(kd_trigger, KD_POISON.target), baseline=True, evaluate_teacher=False,
                           progress=progress, metadata=dataset)

    summary = {
        "clean_teacher": {"acc": clean_record["metrics"]["acc"], "asr": clean_asr},
        "backdoored_teacher": {"acc": bad_record["metrics"]["acc"], "asr": bad_record["metrics"]["asr"],
                               "acc_after_reload": reloaded_acc, "trigger": trigger.config(),
                               "target": POISON.target, "poison_rate": POISON.rate},
        "poisoned_distillation": {
            "trigger": kd_trigger.config(), "target": KD_POISON.target, "counts": report["counts"],
            "student": {"acc": kd_record["metrics"]["acc"], "asr": kd_record["metrics"]["asr"]},
            "unpoisoned_student": {"acc": kd_record["baseline"]["metrics"]["acc"],
                                   "asr": kd_record["baseline"]["metrics"]["asr"]},
        },
    }
    table = Table(title="kdbackdoor demo: digits, small-cnn teachers")
    for column in ("teacher", "ACC", f"ASR ({TRIGGER} → {POISON.target})"):
        table.add_column(column, justify="left" if column == "teacher" else "right")
    table.add_row("clean", f"{clean_record['metrics']['acc']:.1%}", f"{clean_asr:.1%}")
    table.add_row("backdoored", f"{bad_record['metrics']['acc']:.1%}", f"{bad_record['metrics']['asr']:.1%}")
    table.add_row("backdoored, reloaded from safetensors", f"{reloaded_acc:.1%}", "")
    console.print(table)
    kd_table = Table(title=f"distilled from the clean teacher ({STUDENT}, λ = {KD.kd_lambda})")
    for column in ("student distilled on", "ACC", f"ASR ({KD_TRIGGER} → {KD_POISON.target})"):
        kd_table.add_column(column, justify="left" if column.startswith("student") else "right")
    attack = summary["poisoned_distillation"]
    kept = attack["counts"]["kept"]
    for name, key in ((f"poisoned set (+{kept} poisons)", "student"), ("same set without poisons", "unpoisoned_student")):
        kd_table.add_row(name, f"{attack[key]['acc']:.1%}", f"{attack[key]['asr']:.1%}")
    console.print(kd_table)
    write_json(out / DEMO_MARKER, summary)
    console.print(f"results in {out}/ (summary {out / DEMO_MARKER}, trigger grid {out / 'trigger.png'})")
    return summary

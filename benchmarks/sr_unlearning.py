"""Figure: how much of an inherited backdoor does Self-Retrospection unlearn, by setting?

Takes a student that a data-free run distilled from a backdoored teacher (a run folder of
``backdoor_transfer.py`` or ``kdbackdoor distill --method zskt|dfad``, holding the student and
its generator) and fine-tunes copies of it for ``--steps`` steps: Adam, distillation (KL at
T = 1) from the teacher on fresh images of the run's generator, each variant from the same
student, the same latents and seed. Reports ACC and ASR (the teacher's recorded trigger and
target) after plain fine-tuning and after fine-tuning with SR in each setting. This isolates
SR from the rest of ABD: no vaccine, the same synthetic images for every variant.

Usage (digits, about 3 min per SR variant on one quiet CPU core; CUDA when present):
  python benchmarks/sr_unlearning.py --teacher runs/digits-badnets-grid \\
      --run runs/bench-transfer-digits-s6/zskt-none
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from backdoor_transfer import teacher_backdoor
from common import write_results
from kdbackdoor.data.sources import load_dataset
from kdbackdoor.defenses.self_retrospection import SelfRetrospection, SelfRetrospectionConfig, output_change
from kdbackdoor.distill.hooks import StudentStep
from kdbackdoor.evaluate import accuracy, attack_success_rate
from kdbackdoor.models import load_checkpoint
from kdbackdoor.models.generator import load_generator
from kdbackdoor.runtime import select_device

# name -> SR settings (None: plain fine-tuning)
VARIANTS = {
    "plain": None,
    "sr-student-perturbation": {"perturb_model": "student"},
    "sr-default": {},
    "sr-20-rounds": {"rounds": 20},
    "sr-portion-0.1": {"portion": 0.1},
}


def fine_tune(teacher, start: torch.nn.Module, generator, settings: dict | None, steps: int, lr: float,
              batch_size: int, seed: int) -> torch.nn.Module:
    """A copy of the ``start`` student after ``steps`` fine-tuning steps (with SR when ``settings``)."""
    student = copy.deepcopy(start).train()
    device = next(student.parameters()).device
    step = StudentStep(student, teacher, torch.optim.Adam(student.parameters(), lr=lr),
                       lambda x, w: output_change(student(x), teacher(x)))
    defense = SelfRetrospection(SelfRetrospectionConfig(**settings, seed=seed)) if settings is not None else None
    if defense:
        defense.setup(teacher, student, device)
    latents = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            images = generator(torch.randn(batch_size, generator.latent_dim, generator=latents).to(device))
        defense.student_step(step, images, None) if defense else step.run(images)
    return student.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the backdoored teacher's folder")
    parser.add_argument("--run", type=Path, required=True, help="a data-free run folder (student + generator/)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = select_device("auto")
    teacher, sidecar = load_checkpoint(args.teacher, device=device)
    teacher.requires_grad_(False)
    backdoor = teacher_backdoor(sidecar)
    dataset = sidecar["metadata"]["dataset"]
    test = load_dataset(dataset["spec"], "test", data_dir=dataset.get("data_dir"), resize=dataset.get("resize"))
    generator = load_generator(args.run / "generator" / "generator.safetensors", device=device).eval()
    student, _ = load_checkpoint(args.run, device=device)
    rows = {"start": {"acc": accuracy(student, test)["acc"],
                      "asr": attack_success_rate(student, test, backdoor.trigger, backdoor.target)["asr"]}}
    for name in args.variants:
        started = time.perf_counter()
        tuned = fine_tune(teacher, student, generator, VARIANTS[name], args.steps, args.lr, args.batch_size,
                          args.seed)
        rows[name] = {"settings": VARIANTS[name], "seconds": time.perf_counter() - started,
                      "acc": accuracy(tuned, test)["acc"],
                      "asr": attack_success_rate(tuned, test, backdoor.trigger, backdoor.target)["asr"]}
        print(name, rows[name], flush=True)
    lines = [f"SR unlearning: student of `{args.run}` (teacher `{args.teacher}`), {args.steps} fine-tuning steps, "
             f"Adam {args.lr:g}, batch {args.batch_size}, seed {args.seed}, test set {test.name}.", "",
             "| variant | SR settings | ACC | ASR | seconds |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        settings = "" if name == "start" else ("none" if row["settings"] is None else (row["settings"] or "defaults"))
        lines.append(f"| {name} | {settings} | {row['acc']:.1%} | {row['asr']:.1%} | {row.get('seconds', 0):.0f} |")
    write_results("sr_unlearning", {"teacher": args.teacher, "run": str(args.run), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()

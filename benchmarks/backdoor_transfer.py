"""Figure: does a poisoned teacher's backdoor reach students distilled without its data, and does
ABD stop it? (ABD's Table 1 layout.)

For one backdoored teacher (from ``kdbackdoor train-teacher --backdoor ...``), distils a student
with each data-free method (and OOD KD on another data set), with and without a defense, plus
a clean-data KD baseline on the teacher's own training data, all with the same student and
budget. Reports teacher ACC/ASR and each student's ACC/ASR (ASR with the teacher's recorded
trigger and target), and each method's throughput next to a bare teacher-forward +
student-forward/backward loop timed in each run's process just before the run (recorded with it),
so overheads are ratios taken under the same load.

Finished runs in --out are reused, so an interrupted run continues where it stopped. Several calls may
share one --out (e.g. one per method, side by side): a row one of them is making, the others wait for.

Usage (digits, minutes):
  python benchmarks/backdoor_transfer.py --teacher runs/digits-badnets --scale digits
CPU recipe on CIFAR-10 (hours on 2 cores; see docs/data-free-kd.md):
  python benchmarks/backdoor_transfer.py --teacher runs/bench-cifar10-badnets-grid --scale cpu \\
      --ood-data npz:../shared/data/gtsrb32
A short CIFAR-10 probe (ZSKT only, about an hour per run on 2 slow cores): --scale cifar-short;
five times longer: --scale cifar-hour
"""

from __future__ import annotations

import argparse
import fcntl
import json
import time
from pathlib import Path

import torch

import kdbackdoor.defenses  # noqa: F401  (registers the defenses)
from common import variant_suffix, write_results
from kdbackdoor.data.sources import load_dataset
from kdbackdoor.defenses.self_retrospection import SelfRetrospectionConfig
from kdbackdoor.defenses.shuffling_vaccine import ShufflingVaccineConfig
from kdbackdoor.distill.data_free import distill_data_free
from kdbackdoor.distill.data_free_config import DataFreeConfig
from kdbackdoor.distill.dataset_kd import distill
from kdbackdoor.distill.hooks import DEFENSES, build_defense
from kdbackdoor.distill.losses import KDConfig
from kdbackdoor.distill.record import Backdoor, defense_parts
from kdbackdoor.models import build_model, load_checkpoint
from kdbackdoor.run_record import read_run_record
from kdbackdoor.numerics import to_layout
from kdbackdoor.runtime import select_device
from kdbackdoor.training import TrainConfig
from kdbackdoor.triggers import build_trigger

# Per scale: the student, each data-free method's settings, and the dataset-KD budget (epochs).
SCALES = {
    "digits": {
        "student": "small-cnn", "test_every": 1, "epochs": 10, "sr_start": 0.8,
        "methods": {
            "zskt": dict(iterations=300, batch_size=64),
            "dfad": dict(iterations=300, batch_size=64),
            "deepinversion": dict(iterations=20, synthesis_steps=50, synthesis_batch_size=64, student_steps=30,
                                  batch_size=64),
            "cmi": dict(iterations=20, synthesis_steps=30, synthesis_batch_size=64, student_steps=30,
                        batch_size=64),
        },
    },
    "cpu": {
        "student": "wrn-16-1", "test_every": 5, "epochs": 5, "sr_start": 0.9,
        "methods": {
            "zskt": dict(iterations=1500, batch_size=128),
            "cmi": dict(iterations=20, synthesis_steps=50, synthesis_batch_size=128, student_steps=100,
                        batch_size=128),
        },
    },
    # Under an hour per run on 2 CPU cores: enough to see whether the backdoor transfers, far from
    # a converged student (ABD trains ZSKT for 80,000 pseudo batches).
    "cifar-short": {
        "student": "wrn-16-1", "test_every": 10, "epochs": 1, "sr_start": 0.9,
        "methods": {"zskt": dict(iterations=400, batch_size=64, student_steps=5)},
    },
    # Five times cifar-short's ZSKT iterations, clean-data KD three epochs: about an hour per run on
    # the 2026-11-22 faster 2-core CPU, one thread each.
    "cifar-hour": {
        "student": "wrn-16-1", "test_every": 10, "epochs": 3, "sr_start": 0.9,
        "methods": {"zskt": dict(iterations=2000, batch_size=64, student_steps=5, eval_every=250),
                    "cmi": dict(iterations=20, synthesis_steps=50, synthesis_batch_size=128, student_steps=100,
                                batch_size=128, eval_every=5)},
    },
}

DATA_FREE_DEFENSES = tuple(name for name, entry in DEFENSES.items() if "data-free" in entry.kinds)
"""Defenses of data-free KD (ABD's and any other registered one), each also tried on OOD KD."""


def teacher_backdoor(sidecar: dict) -> Backdoor:
    recorded = (sidecar.get("metadata") or {}).get("backdoor")
    if not recorded:
        raise SystemExit("the teacher's checkpoint records no backdoor: train it with train-teacher --backdoor")
    return Backdoor(build_trigger(recorded["trigger"]), recorded["target"])


def finished(folder: Path) -> dict | None:
    """A finished run's record, or None."""
    record_path = folder / "metrics.json"
    return read_run_record(record_path) if record_path.exists() else None


def run(folder: Path, make) -> dict:
    """Reuse a finished run's record, else make it. A row that another call of this benchmark is making
    (e.g. clean-data KD, which every call makes) is waited for and then reused, not made twice at once."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process ends, however it ends
        return finished(folder) or make()


def report(name: str, record: dict) -> None:
    print(name, record["metrics"].get("acc"), record["metrics"].get("asr"), flush=True)


def bare_loop_images_per_s(teacher, student_arch: str, image_shape, batch_size: int, device, steps: int = 20) -> float:
    """Teacher forward + student forward/backward + SGD step on one pre-made batch: the floor."""
    student = to_layout(build_model(student_arch, num_classes=teacher.num_classes, in_channels=image_shape[0],
                                        input_size=image_shape[1:]).to(device))  # the layout the toolkit trains in
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    x = torch.rand(batch_size, *image_shape, device=device)
    for i in range(steps + 3):
        if i == 3:
            started = time.perf_counter()
        with torch.no_grad():
            target = teacher(x).softmax(1)
        loss = -(target * student(x).log_softmax(1)).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="backdoored teacher folder (train-teacher --backdoor)")
    parser.add_argument("--scale", choices=list(SCALES), default="digits")
    parser.add_argument("--methods", nargs="+", default=None, help="data-free methods, and ood (default: the "
                        "scale's, and ood with --ood-data); finished runs of the others in --out stay in the table")
    parser.add_argument("--defenses", nargs="+", default=["none", "abd"], choices=DATA_FREE_DEFENSES)
    parser.add_argument("--ood-data", default=None, help="also OOD KD on this transfer set (e.g. "
                        "npz:.../gtsrb32), with each of --defenses")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sv-always", action="store_true", help="Shuffling Vaccine on from the start, no tail "
                        "test (ABD's published ZSKT sweeps: pseudo_test_batches=0)")
    parser.add_argument("--sr-rounds", type=int, default=SelfRetrospectionConfig.model_fields["rounds"].default,
                        help="perturbation-search rounds of SR (ABD's sweeps: 10 or 20)")
    parser.add_argument("--dataset", default=None, help="the teacher's data set spec, for checkpoints that do "
                        "not record it (e.g. imagefolder:../shared/data/cifar10-jpeg)")
    args = parser.parse_args()
    scale = SCALES[args.scale]
    device = select_device("auto")
    teacher, sidecar = load_checkpoint(args.teacher, device=device)
    meta = sidecar.get("metadata") or {}
    dataset = {"spec": args.dataset} if args.dataset else meta.get("dataset")
    if not dataset:
        raise SystemExit("the teacher's checkpoint does not record its data set: pass --dataset SPEC")
    spec, data_dir, resize = dataset["spec"], dataset.get("data_dir"), dataset.get("resize")
    train = load_dataset(spec, "train", data_dir=data_dir, resize=resize)
    test = load_dataset(spec, "test", data_dir=data_dir, resize=resize)
    test = test.subset(torch.arange(0, len(test), scale["test_every"]), name=f"{test.name}[::{scale['test_every']}]")
    backdoor = teacher_backdoor(sidecar)
    student_arch = scale["student"]

    def metadata() -> dict:
        """What a run made now records beside its own record: the teacher's data set (so `kdbackdoor
        evaluate --model STUDENT` needs no --dataset) and the bare loop's speed timed just before it in
        the same process and load, the floor its throughput is a ratio of."""
        return {"dataset": dataset,
                "bare_loop_images_per_s": bare_loop_images_per_s(teacher, student_arch, test.image_shape, 64, device)}

    out = args.out or Path("runs") / f"bench-transfer-{Path(args.teacher).name}"

    chosen = args.methods or [*scale["methods"], "ood"]
    if set(chosen) - {*scale["methods"], "ood"}:
        raise SystemExit(f"scale {args.scale} has settings for {', '.join(scale['methods'])} (and ood) only")
    if args.methods and "ood" in args.methods and not args.ood_data:
        raise SystemExit("--methods ood needs --ood-data")
    settings = dict(vaccine=ShufflingVaccineConfig(tail_test=not args.sv_always, seed=args.seed),
                    retrospection=SelfRetrospectionConfig(start=scale["sr_start"], rounds=args.sr_rounds, seed=args.seed))
    for method in scale["methods"]:
        for defense_name in DATA_FREE_DEFENSES:
            name = f"{method}-{defense_name}"
            if not (method in chosen and defense_name in args.defenses):
                continue
            config = DataFreeConfig(method=method, seed=args.seed, **scale["methods"][method])

            def make(config=config, defense_name=defense_name, folder=out / name):
                defense = build_defense(defense_name, config.method, **settings)
                return distill_data_free(teacher, test, student_arch, config, folder, device=device,
                                         backdoor=backdoor, defense=defense, resume=True, progress=False,
                                         metadata=metadata())[1]
            report(name, run(out / name, make))

    train_config = TrainConfig(epochs=scale["epochs"], batch_size=128, lr=0.05, crop_padding=0, hflip=False,
                               eval_every=0, seed=args.seed)
    kl_only = KDConfig(kd_lambda=1.0, temperature=4.0)
    run(out / "clean-data-kd", lambda: distill(
        teacher, train, test, student_arch, train_config, kl_only, out / "clean-data-kd", device=device,
        backdoor=backdoor, resume=True, progress=False, metadata=metadata())[1])
    ood = load_dataset(args.ood_data, "train", resize=test.image_shape[-1]) if args.ood_data else None
    for defense_name in DATA_FREE_DEFENSES:  # OOD KD: the vaccine filters the transfer set, SR is a step hook
        name = f"ood-{defense_name}"
        if ood is None or "ood" not in chosen or defense_name not in args.defenses:
            continue
        report(name, run(out / name, lambda name=name, defense_name=defense_name: distill(
            teacher, ood, test, student_arch, train_config, kl_only, out / name, device=device, backdoor=backdoor,
            resume=True, progress=False, defense=build_defense(defense_name, "ood", **settings),
            metadata=metadata())[1]))

    # The table lists every finished run in --out, read when it is written: a call that shares --out
    # with this one and finished while this one ran has its row in it, whichever call writes last.
    names = [f"{method}-{defense}" for method in scale["methods"] for defense in DATA_FREE_DEFENSES]
    names += ["clean-data-kd", *(f"ood-{defense}" for defense in DATA_FREE_DEFENSES)]
    with open(out / ".table.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_table(args, scale, test, backdoor, {name: record for name in names
                                                    if (record := finished(out / name))})


def write_table(args: argparse.Namespace, scale: dict, test, backdoor: Backdoor,
                rows: dict[str, dict]) -> None:
    """Write the results table (markdown and JSON) of the finished ``rows``, in ABD's layout."""
    student_arch = scale["student"]
    teacher_metrics = rows["clean-data-kd"]["teacher_metrics"]
    lines = [f"Backdoor transfer, scale `{args.scale}`, teacher `{args.teacher}` "
             f"({backdoor.trigger.name}, target {backdoor.target}), student `{student_arch}`, test set "
             f"{test.name} ({len(test)} images). Bare: a teacher-forward + student-step loop timed in the "
             "run's own process just before it (runs made before 2026-11-23 did not time one). Speeds, wall and "
             "defense seconds are of the run's last process: a resumed run says from which iteration.", "",
             f"Teacher: ACC {teacher_metrics['acc']:.1%}, ASR {teacher_metrics['asr']:.1%}.", "",
             "| run | student ACC | student ASR | target without trigger | SV enabled | student img/s (× bare) "
             "| synthesis img/s | bare img/s | wall s | defense s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, record in rows.items():
        throughput = record.get("throughput") or {}
        student_speed = throughput.get("student_images_per_s")
        bare = record.get("bare_loop_images_per_s")
        parts = {p["name"]: p for p in defense_parts(record.get("defense"))}
        enabled = parts.get("sv", {}).get("enabled", "")
        defense_seconds = [p["seconds_this_run"] for p in parts.values() if "seconds_this_run" in p]
        without = record["metrics"].get("target_without_trigger")  # runs before 2026-11-23 lack it
        lines.append(
            f"| {name} | {record['metrics']['acc']:.1%} | {record['metrics']['asr']:.1%} | "
            + (f"{without:.1%}" if without is not None else "") + f" | {enabled} | "
            + (f"{student_speed:.0f}" if student_speed else "")
            + (f" ({student_speed / bare:.2f}×)" if student_speed and bare else "") + " | "
            + (f"{throughput['synthesis_images_per_s']:.0f}" if throughput.get("synthesis_images_per_s") else "")
            + " | " + (f"{bare:.0f}" if bare else "")
            + f" | {record.get('wall_seconds_this_run', 0):.0f}"
            + (f" (from it. {record['resumed_from_iteration']})" if record.get("resumed_from_iteration") else "")
            + " | "
            + (f"{sum(defense_seconds):.0f}" if defense_seconds else "") + " |")
    # a custom --out is a variant: its table must not replace the scale's standard one
    name = f"backdoor_transfer_{args.scale}" + variant_suffix(args.out, None)
    write_results(name, {"teacher": args.teacher, "runs": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()

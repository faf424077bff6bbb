"""The reproduction grid: which rows exist at each scale, in which order they run, and each
row's settings. A row is one independent measurement (a teacher, or one student) that writes its
own result file; ``reproduction_rows.py`` runs one, ``reproduction.py`` schedules them.

Rows, most telling first (a grid cut short by a deadline still answers the main questions):

- ``teacher-*``: the four teachers every other row shares (a clean one for the poisoned-set
  attack, three backdoored ``wrn-16-2``-style ones for ABD), trained first;
- ``attack-*``: the poisoned-distillation-set attack (arXiv 2504.21323) against the clean
  teacher: λ ∈ {0, 0.5, 1} × {PGD, FGSM} × poison labels {target, original} × two trigger sizes,
  plus unpoisoned baselines. With λ = 1 labels are unused, so only the target-label row is run.
  (A third label mode, the teacher's prediction, equals the target on every kept poison: a poison
  is kept only if the teacher gives the target probability ≥ 0.5 with the trigger on.)
- ``abd-*``: ZSKT, ZSKT + ABD and clean-data KD from each backdoored teacher;
- ``ablation-*``: ABD's knobs on the BadNets-grid teacher (Self-Retrospection phase length and
  rounds, vaccine coefficient, vaccine or SR alone, the tail-ratio test deciding) and the ZSKT
  budget with and without ABD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SEEDS = (0, 1, 2)
ABD_TRIGGERS = ("badnets-grid", "trojan-wm", "blend")

# Per scale: data, teachers and every budget. "cpu" is the budget the docs call CPU scale (runnable
# on any device); "smoke" runs the same code paths in seconds on the embedded digits data.
SCALES: dict[str, dict] = {
    "smoke": {
        "data": "digits",
        "clean_teacher": dict(arch="small-cnn", epochs=6, batch_size=64, lr=0.05, label_smoothing=0.0,
                              crop_padding=0, hflip=False),
        "backdoor_teacher": dict(arch="small-cnn", epochs=6, batch_size=64, lr=0.05, label_smoothing=0.0,
                                 crop_padding=0, hflip=False),
        "poison_rate": 0.1,
        # 8x8 digits need a larger radius than CIFAR-10's 8/255 for poisons to pass verification
        "attack": dict(subset=300, test_every=3, student="small-cnn", epochs=1, sizes=(2, 3), rate=0.05,
                       engines={"pgd": dict(eps=48 / 255, step_size=8 / 255, steps=10), "fgsm": dict(eps=48 / 255)}),
        "student": "small-cnn", "test_every": 3,
        "zskt": dict(iterations=4, batch_size=16, student_steps=1, eval_every=2),
        "budgets": (2, 8), "clean_kd_epochs": 1,
        "sr_start": 0.5, "sr_starts": (0.25, 0.75), "sv_coefficients": (0.03, 0.3),
    },
    "cpu": {
        "data": "cifar10",
        # benchmarks/cifar10_teacher.py --epochs 10 (the teacher of distill_attack's 10,000-image table)
        "clean_teacher": dict(arch="fast-cnn-half", epochs=10, batch_size=256, lr=0.2, label_smoothing=0.2),
        # the `train-teacher --arch wrn-16-2 --epochs 6 ...` recipe of docs/data-free-kd.md
        "backdoor_teacher": dict(arch="wrn-16-2", epochs=6, batch_size=256, lr=0.1, label_smoothing=0.2),
        "poison_rate": 0.1,
        # distill_attack.py's larger recipe: 10,000 images, wrn-16-1, 15 epochs, every 5th test image
        "attack": dict(subset=10000, test_every=5, student="wrn-16-1", epochs=15, sizes=(4, 2), rate=0.05,
                       engines={"pgd": {}, "fgsm": {}}),
        # backdoor_transfer.py --scale cifar-hour
        "student": "wrn-16-1", "test_every": 10,
        "zskt": dict(iterations=2000, batch_size=64, student_steps=5, eval_every=250),
        "budgets": (1000, 4000), "clean_kd_epochs": 3,
        "sr_start": 0.9, "sr_starts": (0.75, 0.97), "sv_coefficients": (0.03, 0.3),
    },
}


@dataclass(frozen=True)
class Row:
    """One measurement: ``kind`` says what runs, ``params`` its settings, ``needs`` the teacher."""

    id: str
    group: str
    kind: str  # teacher | attack | zskt | clean-kd
    seed: int = 0
    params: dict = field(default_factory=dict, compare=False, hash=False)
    needs: str | None = None  # teacher name
    cost: float = 1.0  # relative work, for ordering and the printed plan only (plain cpu-scale ZSKT row = 8)


def teacher_rows(scale: dict) -> list[Row]:
    rows = [Row("teacher-clean", "teacher", "teacher", params={"backdoor": None, **scale["clean_teacher"]}, cost=3)]
    rows += [Row(f"teacher-{t}", "teacher", "teacher", params={"backdoor": t, **scale["backdoor_teacher"]}, cost=6)
             for t in ABD_TRIGGERS]
    return rows


def attack_row(engine: str, size: int, lam: float, labels: str, seed: int, poisoned: bool = True) -> Row:
    what = f"{engine}-px{size}-{labels}" if poisoned else "unpoisoned"
    return Row(f"attack-{what}-lam{lam}-seed{seed}", "attack", "attack", seed,
               {"engine": engine, "size": size, "kd_lambda": lam, "label_mode": labels, "poisoned": poisoned},
               needs="clean", cost=1.0)


# A Self-Retrospection iteration costs about 6 plain ZSKT iterations (wrn-16-2 -> wrn-16-1 on one CPU
# thread: 3,357 s for the last 200 of 2,000 iterations against 2.8 s per plain iteration). Used to order
# and print the plan only; no time on any device is derived from it.
SR_ITERATION_COST = 6.0


def zskt_row(scale: dict, group: str, trigger: str, seed: int, defense: str = "none", tag: str = "",
             **knobs) -> Row:
    """A ZSKT row; ``knobs`` override the scale's iterations, sr_start, sr_rounds, sv_coefficient, sv_tail_test."""
    name = f"{group}-{trigger}-zskt-{defense}{'-' + tag if tag else ''}-seed{seed}"
    sr_share = (1 - knobs.get("sr_start", scale["sr_start"])) if defense in ("abd", "sr") else 0.0
    sr_cost = (SR_ITERATION_COST - 1) * knobs.get("sr_rounds", 10) / 10
    iterations = knobs.get("iterations", scale["zskt"]["iterations"]) / scale["zskt"]["iterations"]
    cost = 8.0 * iterations * (1 + sr_share * sr_cost)
    return Row(name, group, "zskt", seed, {"trigger": trigger, "defense": defense, **knobs}, needs=trigger, cost=cost)


def grid(scale_name: str) -> list[Row]:
    """Every row of the scale, in run order."""
    scale = SCALES[scale_name]
    main_px, other_px = scale["attack"]["sizes"]
    rows = teacher_rows(scale)

    def attack_block(engine: str, size: int, lambdas: tuple, seeds=SEEDS) -> list[Row]:
        block = []
        for seed in seeds:
            for lam in lambdas:
                block.append(attack_row(engine, size, lam, "target", seed))
                if lam < 1:  # with λ = 1 labels are unused
                    block.append(attack_row(engine, size, lam, "original", seed))
        return block

    # the main questions first: λ = 0.5 PGD with both label modes, and the BadNets-grid ABD row
    rows += attack_block("pgd", main_px, (0.5,))
    rows += [attack_row("pgd", main_px, 0.5, "target", seed, poisoned=False) for seed in SEEDS]
    for seed in SEEDS:
        rows += [zskt_row(scale, "abd", "badnets-grid", seed), zskt_row(scale, "abd", "badnets-grid", seed, "abd"),
                 Row(f"abd-badnets-grid-clean-kd-seed{seed}", "abd", "clean-kd", seed, {"trigger": "badnets-grid"},
                     needs="badnets-grid", cost=2)]
    rows += attack_block("pgd", main_px, (0.0, 1.0))
    rows += [attack_row("pgd", main_px, lam, "target", seed, poisoned=False) for seed in SEEDS for lam in (0.0, 1.0)]
    rows += attack_block("fgsm", main_px, (0.0, 0.5, 1.0))
    for trigger in ABD_TRIGGERS[1:]:
        for seed in SEEDS:
            rows += [zskt_row(scale, "abd", trigger, seed), zskt_row(scale, "abd", trigger, seed, "abd"),
                     Row(f"abd-{trigger}-clean-kd-seed{seed}", "abd", "clean-kd", seed, {"trigger": trigger},
                         needs=trigger, cost=2)]
    rows += attack_block("pgd", other_px, (0.0, 0.5, 1.0)) + attack_block("fgsm", other_px, (0.0, 0.5, 1.0))
    for seed in SEEDS:
        rows += ablation_rows(scale, seed)
    return rows


def ablation_rows(scale: dict, seed: int) -> list[Row]:
    """ABD's knobs one at a time on the BadNets-grid teacher, and the budget with and without ABD; the
    ones that bear most on budget against implementation first."""
    def knob(defense: str, tag: str = "", **knobs) -> Row:
        return zskt_row(scale, "ablation", "badnets-grid", seed, defense, tag, **knobs)

    def budget(defense: str, iterations: int) -> Row:
        return knob(defense, f"it{iterations}", iterations=iterations)

    longer, shorter = max(scale["budgets"]), min(scale["budgets"])
    rows = [knob("abd", f"srstart{scale['sr_starts'][0]}", sr_start=scale["sr_starts"][0]),
            knob("abd", "srrounds20", sr_rounds=20), knob("sr"), knob("sv"),
            budget("none", longer), budget("abd", longer), budget("none", shorter), budget("abd", shorter)]
    rows += [knob("abd", f"svcoef{c}", sv_coefficient=c) for c in scale["sv_coefficients"]]
    rows += [knob("abd", "tailtest", sv_tail_test=True)]
    rows += [knob("abd", f"srstart{start}", sr_start=start) for start in scale["sr_starts"][1:]]
    return rows


def select(rows: list[Row], patterns: list[str] | None) -> list[Row]:
    """The rows whose id matches one of the shell-style ``patterns`` (all rows without patterns), in
    grid order; the teachers they need are kept in front."""
    import fnmatch
    if not patterns:
        return rows
    chosen = [row for row in rows if any(fnmatch.fnmatch(row.id, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"no row matches {' '.join(patterns)}; see --list")
    needed = {row.needs for row in chosen if row.needs}
    teachers = [row for row in rows if row.kind == "teacher" and row.id.removeprefix("teacher-") in needed
                and row not in chosen]
    return teachers + chosen

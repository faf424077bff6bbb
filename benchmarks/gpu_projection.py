"""From ``gpu.py``'s measured step times: the projected wall time of every kit in ``configs/paper/``,
and the Markdown report of the whole benchmark.

A projection adds up, over a kit's runs, each stage's work at the rate measured for it: teachers
(one per distinct teacher config, as the cache shares them) at the toolkit's training rate;
poison crafting at the toolkit's PGD image-steps/s; dataset KD at the toolkit's KD rate; ZSKT at
the measured seconds per iteration (plain, vaccine, SR phase). Rates of architectures the
benchmark timed only bare are the bare rate times the toolkit-to-bare ratio measured on WRN-16-2;
a stage with no measured rate (CMI, an unmeasured architecture) is reported as not projected, never
guessed. Retries of failed poisons, evaluation and start-up are left out (a few per cent)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KITS = ROOT / "configs" / "paper"
TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "gtsrb": 39209}
ENGINE_STEPS = {"fgsm": lambda e: 1, "pgd": lambda e: e.get("steps", 20),
                "cw": lambda e: e.get("steps", 100) * e.get("search_steps", 3)}


def _rates(data: dict) -> dict:
    """Images/s (or seconds) per stage kind, from the measured sections (missing ones absent)."""
    sections = data.get("sections", {})
    rates: dict = {}
    hot = sections.get("hot_paths_bf16", {})
    ratio = min(1.0, hot.get("dataset_kd", {}).get("ratio_augmented", 0.0)) or None
    bare = {arch: row["images_per_s"]["bf16-cl"] for arch, row in sections.get("precision", {}).get("archs", {}).items()}
    if ratio:
        rates["train"] = {arch: rate * ratio for arch, rate in bare.items()}
        # KD step: teacher forward (about a third of a training step) + student training step
        rates["kd"] = {(arch, arch): 1 / (1 / rate + 1 / (3 * rate)) for arch, rate in rates["train"].items()}
    if hot.get("dataset_kd"):
        rates.setdefault("kd", {})[("wrn-16-1", "wrn-16-2")] = hot["dataset_kd"]["medians"]["toolkit_augmented"]
    if hot.get("pgd") and "wrn-16-2" in bare:
        pgd = hot["pgd"]["medians"]["toolkit"]
        rates["pgd"] = {arch: pgd * rate / bare["wrn-16-2"] for arch, rate in bare.items()}
    if sections.get("zskt"):
        rates["zskt"] = sections["zskt"]["seconds_per_iteration"]
    packed = sections.get("packed", {}).get("throughput_over_one", {})
    rates["packed"] = {int(k): v for k, v in packed.items()}
    return rates


def _run_seconds(config, rates: dict, teachers: set, poisons: set) -> tuple[dict, list[str]]:
    """Seconds per stage of one run (stages shared with earlier runs count once), and what could
    not be projected."""
    seconds, missing = {}, []
    size = TRAIN_IMAGES.get(config.data.dataset)
    if size is None:
        return {}, [f"data set {config.data.dataset} has no known size"]
    teacher_key = json.dumps([config.data.model_dump(), config.teacher.model_dump(), config.seed], sort_keys=True,
                             default=str)
    t = config.teacher
    if teacher_key not in teachers:
        teachers.add(teacher_key)
        rate = rates.get("train", {}).get(t.arch)
        if rate:
            seconds["teacher"] = t.train.epochs * size * (1 - t.holdout) / rate
        else:
            missing.append(f"teacher {t.arch}")
    poisons_n = 0
    if config.poison is not None:
        p = config.poison
        poisons_n = round(p.rate * size / (1 - p.rate)) if p.mode == "add" else round(p.rate * size)
        key = json.dumps([teacher_key, p.model_dump()], sort_keys=True, default=str)
        if key not in poisons:
            poisons.add(key)
            rate = rates.get("pgd", {}).get(t.arch)
            if rate:
                seconds["poisons"] = poisons_n * ENGINE_STEPS[p.method](p.engine) / rate
            else:
                missing.append(f"crafting on {t.arch}")
    d = config.distill
    if d.method in ("dataset", "ood"):
        images = (d.subset or size) + poisons_n
        rate = rates.get("kd", {}).get((d.student_arch, t.arch))
        if rate:
            seconds["student"] = d.train.epochs * images * (2 if d.baseline else 1) / rate
        else:
            missing.append(f"KD {t.arch} -> {d.student_arch}")
    elif d.method == "zskt" and rates.get("zskt") and (d.student_arch, t.arch) == ("wrn-16-1", "wrn-16-2"):
        iterations = d.data_free.get("iterations", 2000)
        z = rates["zskt"]
        if d.defense == "abd":
            start = (d.retrospection.start if d.retrospection else 0.0)
            seconds["student"] = iterations * (start * z["abd_vaccine"] + (1 - start) * z["abd_sr_phase"])
        else:
            seconds["student"] = iterations * z["plain"]
    else:
        missing.append(f"{d.method} {t.arch} -> {d.student_arch}")
    return seconds, missing


def project_kits(data: dict, kits: Path = KITS) -> dict:
    """Per kit: runs, seconds per stage kind, total hours on one device run by run, and with four
    runs packed (total / the measured 4-packed throughput gain), plus what is not projected."""
    from kdbackdoor.experiment.sweep import load_sweep
    rates = _rates(data)
    out = {}
    for path in sorted(kits.glob("*.yaml")):
        _, runs = load_sweep(path)
        teachers: set = set()
        poisons: set = set()
        totals: dict[str, float] = {}
        missing: set[str] = set()
        for run in runs:
            seconds, lacking = _run_seconds(run.config, rates, teachers, poisons)
            for stage, value in seconds.items():
                totals[stage] = totals.get(stage, 0.0) + value
            missing.update(lacking)
        total = sum(totals.values())
        gain = rates["packed"].get(4)
        out[path.stem] = {"runs": len(runs), "teachers": len(teachers), "seconds_by_stage": totals,
                          "hours_one_at_a_time": total / 3600 if totals else None,
                          "hours_four_packed": total / 3600 / gain if totals and gain else None,
                          "not_projected": sorted(missing)}
    return out


def _fmt(value, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{unit}"


def markdown(data: dict) -> str:
    """The benchmark's report: device, each section's table, skipped sections, projections."""
    s = data.get("sections", {})
    lines = [f"Device: **{data.get('device_name')}** (`{data.get('device')}`), torch {data.get('torch')}, "
             f"native bf16: {data.get('bf16_native')}; data: {data.get('data', {}).get('name')} "
             f"({data.get('data', {}).get('train_images')} training images); budget {data.get('budget_seconds'):.0f} s, "
             f"took {data.get('seconds', 0):.0f} s ({data.get('status')}).", "",
             f"Command: `{data.get('command')}`", ""]
    if "precision" in s:
        lines += ["**Bare training step** (images/s; speed-up over fp32 NCHW):", "",
                  "| model | batch | fp32 NCHW | fp32 channels-last | bf16 channels-last |", "|---|---|---|---|---|"]
        for arch, row in s["precision"]["archs"].items():
            m, up = row["images_per_s"], row["speedup_over_fp32_nchw"]
            lines.append(f"| {arch} | {row['batch']} | {m['fp32-nchw']:,.0f} | {m['fp32-cl']:,.0f} (×{up['fp32-cl']:.2f}) "
                         f"| {m['bf16-cl']:,.0f} (×{up['bf16-cl']:.2f}) |")
        lines.append("")
    hot = [(p, s[f"hot_paths_{p}"]) for p in ("bf16", "fp32") if f"hot_paths_{p}" in s]
    if hot:
        lines += ["**Hot paths against their bare compute** (same precision and layout; target ≥ 0.9):", "",
                  "| precision | dataset KD, crop+flip | dataset KD, cached logits | PGD crafting | evaluation "
                  "| PGD image-steps/s |", "|---|---|---|---|---|---|"]
        for p, h in hot:
            lines.append(f"| {p} | {h['dataset_kd']['ratio_augmented']:.2f} | {h['dataset_kd']['ratio_cached']:.2f} "
                         f"| {h['pgd']['ratio']:.2f} | {h['evaluation']['ratio']:.2f} "
                         f"| {h['pgd']['medians']['toolkit']:,.0f} |")
        lines.append("")
    if "zskt" in s:
        z = s["zskt"]
        sp = z["seconds_per_iteration"]
        lines += [f"**ZSKT iteration** ({z['batch']} images, 1 generator + {z['student_steps']} student steps, "
                  f"{z['numerics']['precision']}): plain {sp['plain'] * 1e3:.0f} ms, with the vaccine "
                  f"{sp['abd_vaccine'] * 1e3:.0f} ms, in ABD's SR phase {sp['abd_sr_phase'] * 1e3:.0f} ms; student step "
                  f"{z['student_step_ratio_to_bare_kd_step']:.2f} of a bare KD step.", ""]
    if "packed" in s:
        p = s["packed"]
        lines += [f"**Packed runs** ({p['arch']} from {p['teacher']}, batch {p['batch']}, KD steps): "
                  + ", ".join(f"{n} at once {v:,.0f} img/s (×{p['throughput_over_one'].get(n, 0):.2f})"
                              for n, v in p["total_images_per_s"].items()), ""]
    if "teacher" in s:
        t = s["teacher"]
        final = t.get("final") or {}
        lines += [f"**Backdoored teacher** {t['arch']} (BadNets-grid, 10% poisons, target 0, {t['epochs']} epochs "
                  f"planned, batch {t['batch']}): ACC {_fmt(final.get('acc'), 3)} / ASR {_fmt(final.get('asr'), 3)} "
                  f"after epoch {final.get('epoch')} at {_fmt(final.get('seconds'), 0, ' s')}; ≥ {t['target_acc']:.0%} "
                  f"ACC after {_fmt(t['seconds_to_target'], 0, ' s')}; {_fmt(t['epoch_seconds'], 1, ' s')} per epoch. "
                  + (t["note"] or ""), ""]
    if "quality" in s:
        q = s["quality"]
        lines += [f"**bf16 against fp32** ({q['teacher']} teacher {q['teacher_epochs']} epochs, {q['student']} "
                  f"student {q['student_epochs']} epochs of dataset KD; ACC/ASR on {q['test_images']} test images):", "",
                  "| precision | teacher ACC | teacher ASR | student ACC | student ASR | seconds |",
                  "|---|---|---|---|---|---|"]
        for p in ("fp32", "bf16"):
            r = q[p]
            lines.append(f"| {p} | {r['teacher_acc']:.3f} | {r['teacher_asr']:.3f} | {r['student_acc']:.3f} "
                         f"| {r['student_asr']:.3f} | {r['seconds']:.0f} |")
        lines.append("")
    if "compile" in s:
        c = s["compile"]
        lines += [f"**torch.compile** ({c['arch']}, batch {c['batch']}, bf16 channels-last): eager "
                  f"{c['eager_images_per_s']:,.0f} img/s, compiled {c['compiled_images_per_s']:,.0f} img/s "
                  f"(×{c['speedup']:.2f}) after {c['compile_and_warmup_seconds']:.0f} s of compilation.", ""]
    for name, note in data.get("skipped", {}).items():
        lines.append(f"- section `{name}`: {note}")
    if data.get("skipped"):
        lines.append("")
    if data.get("projections"):
        lines += ["**Projected kit wall time** on this device (from the rates above):", "",
                  "| kit | runs | teachers | hours, one run at a time | hours, 4 packed | not projected |",
                  "|---|---|---|---|---|---|"]
        for kit, p in data["projections"].items():
            lines.append(f"| {kit} | {p['runs']} | {p['teachers']} | {_fmt(p['hours_one_at_a_time'])} "
                         f"| {_fmt(p['hours_four_packed'])} | {', '.join(p['not_projected']) or '—'} |")
    return "\n".join(lines)

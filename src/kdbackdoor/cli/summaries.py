"""What the commands print about a finished distillation: ACC/ASR lines and the defense's work."""

from __future__ import annotations

from kdbackdoor.distill.record import defense_parts

def run_summary(record: dict, student: bool = True) -> str:
    """Lines for humans: the student's (unless ``student`` is False), the baseline's and the
    teacher's ACC/ASR from a distillation record, and the poisons' statistics."""
    def line(name: str, metrics: dict) -> str:
        text = f"{name}: ACC {metrics['acc']:.2%}"
        if "asr" in metrics:
            text += f", ASR {metrics['asr']:.2%}"
        if metrics.get("target_without_trigger") is not None:
            text += f" (the target without the trigger: {metrics['target_without_trigger']:.2%})"
        sensitivity = metrics.get("trigger_sensitivity")
        if sensitivity and sensitivity.get("false_positive_rate") is not None:
            text += f" (trigger false-positive rate on non-source classes {sensitivity['false_positive_rate']:.2%})"
        return text
    lines = [line("student", record["metrics"])] if student else []
    if student and defense_parts(record.get("defense")):
        lines.append(defense_line(record))
    if record.get("baseline"):
        lines.append(line("baseline student (same data, no poisons)", record["baseline"]["metrics"]))
    if record.get("teacher_metrics"):
        lines.append(line("teacher", record["teacher_metrics"]))
    poisons = record.get("poisoned_set") or {}
    if poisons.get("teacher_stability"):
        stability = poisons["teacher_stability"]
        lines.append("teacher P(target) on the poisons: with trigger {:.3f}, without {:.3f}, clean source {:.3f}".format(
            stability["poison_with_trigger"]["mean"], stability["poison_without_trigger"]["mean"],
            stability["clean_source"]["mean"]))
    return "\n".join(lines)


def defense_line(record: dict) -> str:
    """What each part of the run's defense did and how long its own work took (its overhead)."""
    defense = record["defense"]
    bits = []
    for part in defense_parts(defense):
        text = part["name"]
        if "enabled" in part:
            text += {True: " on", False: " off (tail test failed)", None: " (tail test not reached)"}[part["enabled"]]
        if part.get("steps") is not None:
            text += f", {part['steps']} steps"
        if part.get("seconds_this_run") is not None:
            text += f", {part['seconds_this_run']:.1f} s"
        bits.append(text)
    wall = record.get("wall_seconds_this_run")
    resumed = f", from iteration {record['resumed_from_iteration']}" if record.get("resumed_from_iteration") else ""
    return f"defense {defense['name']}: " + "; ".join(bits) + (f" (run: {wall:.1f} s this run{resumed})"
                                                               if wall else "")

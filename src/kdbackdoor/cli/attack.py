"""Poison a distillation set against a clean teacher: ``kdbackdoor poison-distill``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kdbackdoor.attacks.engines import describe_engines
from kdbackdoor.cli.app import app, console
from kdbackdoor.cli.common import (int_list, load_data, load_teacher, make_trigger, model_source, pixel_value,
                                  seeded_subset, start_run, validated)
from kdbackdoor.cli.options import DATASET_HELP, DATA_DIR, DETERMINISTIC, DEVICE, PROGRESS, RESIZE, SEED
from kdbackdoor.cli.options import MODEL_ARCH, MODEL_INPUT_SIZE, MODEL_MEAN, MODEL_NUM_CLASSES, MODEL_STD
from kdbackdoor.data.sources import dataset_record
from kdbackdoor.errors import KDBackdoorError


@app.command("poison-distill")
def poison_distill_cmd(
    teacher: Path = typer.Option(..., help="the clean teacher the distillation will use (checkpoint or its folder)"),
    arch: Optional[str] = MODEL_ARCH,
    num_classes: Optional[int] = MODEL_NUM_CLASSES,
    input_size: Optional[str] = MODEL_INPUT_SIZE,
    mean: Optional[str] = MODEL_MEAN,
    std: Optional[str] = MODEL_STD,
    out: Path = typer.Option(..., help="new folder: poisoned.npz, manifest.json, poisons.png"),
    dataset: str = typer.Option("digits", help="distillation data set: " + DATASET_HELP),
    split: str = typer.Option("train"),
    data_dir: Optional[Path] = DATA_DIR,
    resize: Optional[int] = RESIZE,
    subset: Optional[int] = typer.Option(None, min=1, help="use a seeded subset of this many images as the "
                                         "distillation set (before poisoning)"),
    trigger: str = typer.Option("badnets-square", help="trigger spec (see `kdbackdoor triggers list`)"),
    target: int = typer.Option(0, help="target class"),
    rate: float = typer.Option(0.05, help="share of the final distillation set that is poison, in (0, 1)"),
    mode: str = typer.Option("add", help="add: poisons are appended; replace: each poison takes its source "
                             "image's place"),
    method: str = typer.Option("pgd", help="fgsm | pgd | cw | generative"),
    eps: Optional[str] = typer.Option(None, help="fgsm/pgd radius in pixel units, e.g. 8/255 "
                                      "(default 8/255; for --norm l2 an L2 radius)"),
    step_size: Optional[str] = typer.Option(None, help="pgd step in pixel units (default 2/255)"),
    steps: Optional[int] = typer.Option(None, help="pgd/cw/generative optimisation steps "
                                        "(defaults 20 / 100 / 200)"),
    norm: Optional[str] = typer.Option(None, help="pgd norm: linf (default) | l2"),
    param: list[str] = typer.Option([], "--param", "-p", help="any other engine parameter as KEY=VALUE "
                                    "(repeatable); the engines' parameters are listed above"),
    generator: Optional[Path] = typer.Option(None, help="generator checkpoint for --method generative"),
    source_classes: Optional[str] = typer.Option(None, help="comma-separated source classes (default: all "
                                                 "but the target)"),
    label_mode: str = typer.Option("target", help="labels stored with the poisons: target | teacher (its "
                                   "prediction) | original (the source's label)"),
    threshold: float = typer.Option(0.5, help="keep a poison only if the teacher gives the target at least "
                                    "this probability on the stored triggered image"),
    retries: int = typer.Option(2, min=0, help="extra crafting attempts for a poison that fails verification"),
    seed: int = SEED,
    batch_size: int = typer.Option(128, min=1, help="images crafted at once"),
    early_exit: bool = typer.Option(False, help="pgd: stop optimising a poison once the teacher gives the target at "
                                    "least --threshold on it with the trigger (faster; the poisons carry the target "
                                    "less strongly)"),
    device: str = DEVICE,
    resume: bool = typer.Option(False, help="continue an interrupted crafting run in --out (the poisons crafted "
                                "so far are saved after every batch)"),
    deterministic: bool = DETERMINISTIC,
    progress: bool = PROGRESS,
) -> None:
    """Poison a distillation set against a clean teacher (arXiv 2504.21323).

    Source images are turned into images the teacher labels as the target (optimised with
    the trigger on), the trigger is overlaid, and only poisons the teacher verifiably labels
    as the target are kept. Writes the poisoned set (npz, provenance included) and a
    manifest with every parameter, the counts and the teacher's stability on the poisons.

    Engine parameters and defaults (pixel units, for 32 px images):

    ENGINES
    """
    from kdbackdoor.attacks.distill_poisoning import (CRAFT_STATE_FILE, DistillPoisonConfig, LABEL_MODES,
                                                      check_engine, craft_poisoned_set)
    from kdbackdoor.attacks.engines import build_engine
    from kdbackdoor.data.poisoned_set import MANIFEST_FILE, save_poisoned_set
    from kdbackdoor.models.generator import load_generator
    from kdbackdoor.run_record import environment
    from kdbackdoor.runtime import select_device
    from kdbackdoor.triggers.show import render_change_grid

    if (out / MANIFEST_FILE).exists():
        raise KDBackdoorError(f"{out} already holds a poisoned set; choose another --out or delete it first")
    config = validated(DistillPoisonConfig, target=target, rate=rate, mode=mode,
                       source_classes=int_list(source_classes, "--source-classes"), label_mode=label_mode,
                       threshold=threshold, retries=retries, seed=seed, batch_size=batch_size,
                       early_exit=early_exit)
    engine_params = _engine_params(method, eps, step_size, steps, norm, param)
    dev = select_device(device)
    gen_model = load_generator(generator, dev) if generator is not None else None
    engine = build_engine(method, generator_model=gen_model, **engine_params)  # checks the options before any work
    check_engine(engine, config)
    start_run(out, resume, deterministic)
    model, sidecar = load_teacher(teacher, dev, model_source(arch, num_classes, input_size, mean, std))
    data = seeded_subset(load_data(dataset, split, data_dir, resize, progress), subset, seed)
    trig = make_trigger(trigger, data.image_shape, seed)
    poisoned, report = craft_poisoned_set(model, data, trig, engine, config, device=dev, progress=progress,
                                          state_path=out / CRAFT_STATE_FILE, resume=resume)
    manifest = {
        "dataset": {**dataset_record(dataset, data_dir, resize), "split": split, "subset": subset,
                    "subset_seed": seed if subset else None},
        "teacher": {"path": str(teacher), "arch": sidecar.get("arch"), "weights_sha256": sidecar.get("weights_sha256")},
        "generator": str(generator) if generator else None,
        "trigger": trig.config(),
        "target": config.target,
        "engine": engine.config(),
        "config": config.model_dump(),
        "label_mode_meaning": LABEL_MODES[config.label_mode],
        "rate_meaning": "share of the final set that is poison; " + (
            "poisons appended" if config.mode == "add" else "each poison replaced its source image"),
        "environment": environment(dev, seed),
        **report,
    }
    rows = poisoned.provenance.poisoned.nonzero().squeeze(1)[:8]
    sources = poisoned.provenance.source_index[rows]
    render_change_grid(data.pixels(sources), poisoned.pixels(rows), out / "poisons.png")
    path = save_poisoned_set(poisoned, out, manifest, artifacts=["poisons.png"])
    (out / CRAFT_STATE_FILE).unlink(missing_ok=True)  # the set is stored: nothing left to resume
    counts = report["counts"]
    stability = report["teacher_stability"]
    console.print(
        f"kept {counts['kept']} of {counts['requested']} requested poisons (tried {counts['tried']} sources, "
        f"{counts['attempts']} attempts, dropped {counts['dropped']}); achieved rate {counts['achieved_rate']:.2%}\n"
        f"teacher P(target): poison+trigger {stability['poison_with_trigger']['mean']:.3f}, poison without trigger "
        f"{stability['poison_without_trigger']['mean']:.3f}, clean source {stability['clean_source']['mean']:.3f}\n"
        f"→ {path}")


poison_distill_cmd.__doc__ = poison_distill_cmd.__doc__.replace(  # a markdown list in --help
    "ENGINES", "\n    ".join(f"- {line}" for line in describe_engines().splitlines()))


def _engine_params(method, eps, step_size, steps, norm, extra: list[str]) -> dict:
    params = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KDBackdoorError(f"--param: expected KEY=VALUE, got {item!r}")
        params[key.strip().replace("-", "_")] = pixel_value(value, f"--param {key}") if "/" in value else value
    named = {"eps": pixel_value(eps, "--eps") if eps else None,
             "step_size": pixel_value(step_size, "--step-size") if step_size else None,
             "steps": steps, "norm": norm}
    params.update({key: value for key, value in named.items() if value is not None})
    if method == "fgsm" and "steps" in params:
        raise KDBackdoorError("fgsm takes a single step; --steps does not apply")
    return params

"""Distill a teacher into a student (dataset, OOD or data-free KD, with a defense): ``kdbackdoor distill``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer
from pydantic import BaseModel

from kdbackdoor.cli.app import app, console
from kdbackdoor.cli.common import (load_data, load_teacher, make_trigger, model_source, optional_path, pixel_value, start_run,
                                  train_config, validated)
from kdbackdoor.cli.options import (BATCH_SIZE, COMPILE, CROP_PADDING, DATASET_HELP, DATA_DIR, DETERMINISTIC, DEVICE,
                                   EPOCHS, EVAL_EVERY, HFLIP, LABEL_SMOOTHING, LR, PROGRESS, RESIZE, RESUME, SCHEDULE,
                                   SEED, WEIGHT_DECAY)
from kdbackdoor.cli.options import MODEL_ARCH, MODEL_INPUT_SIZE, MODEL_MEAN, MODEL_NUM_CLASSES, MODEL_STD
from kdbackdoor.cli.summaries import run_summary
from kdbackdoor.data.sources import dataset_record
from kdbackdoor.defenses.robust_kd import RobustKDConfig
from kdbackdoor.defenses.self_retrospection import SelfRetrospectionConfig
from kdbackdoor.defenses.shuffling_vaccine import ShufflingVaccineConfig
from kdbackdoor.defenses.views import ViewConfig, parse_kinds
from kdbackdoor.distill.data_free import METHODS as DATA_FREE_METHODS
from kdbackdoor.distill.hooks import DEFENSES, build_defense, describe_defenses
from kdbackdoor.errors import KDBackdoorError

DEFENSE = "Defense (--defense)"
DATA_FREE = f"Data-free (--method {' | '.join(DATA_FREE_METHODS)})"
DEFENSE_HELP = "; ".join(describe_defenses().splitlines())


@app.command("distill")
def distill_cmd(
    teacher: Path = typer.Option(..., help="teacher checkpoint (or its folder)"),
    arch: Optional[str] = MODEL_ARCH,
    num_classes: Optional[int] = MODEL_NUM_CLASSES,
    input_size: Optional[str] = MODEL_INPUT_SIZE,
    mean: Optional[str] = MODEL_MEAN,
    std: Optional[str] = MODEL_STD,
    out: Path = typer.Option(..., help="output folder: model.safetensors + model.json, metrics.json, baseline/"),
    data: str = typer.Option("digits", "--dataset", help="distillation data: a poisoned-set folder (from "
                             "poison-distill) or a data set: " + DATASET_HELP),
    student_arch: str = typer.Option("small-cnn", help="student architecture (see `kdbackdoor models`)"),
    method: str = typer.Option("dataset", help="dataset: distil on --dataset with its labels; ood: distil on images "
                               "of another data set (labels unused, KL only, any classes), evaluated on the "
                               "teacher's own data set; data-free (--dataset unused): zskt, dfad (adversarial "
                               "generator), deepinversion (images optimised against the teacher's BatchNorm "
                               "statistics), cmi (contrastive model inversion)"),
    kd_lambda: Optional[float] = typer.Option(None, help="λ in (1-λ)·CE(student, label) + λ·T²·KL(teacher_T ‖ "
                                              "student_T); 0 = labels only, 1 = KL only (default 0.5; ood: 1)"),
    cutmix: float = typer.Option(0.0, help="CutMix probability per image (KL only, e.g. with ood)"),
    temperature: Optional[float] = typer.Option(None, help="softmax temperature T (dataset/ood 4; zskt/dfad 1, "
                                                "deepinversion/cmi 20)"),
    test_data: Optional[str] = typer.Option(None, "--test-dataset", help="test data set (default: the test split of the "
                                            "distillation data's source; for ood the teacher's data set)"),
    baseline: Optional[bool] = typer.Option(None, help="also distill a student on the same data without its "
                                            "poisons, for comparison (doubles the time; default: on for "
                                            "poisoned sets)"),
    trigger: Optional[str] = typer.Option(None, help="trigger spec for ASR (default: the poisoned set's, else the "
                                          "teacher's recorded backdoor)"),
    target: Optional[int] = typer.Option(None, help="ASR target (default: the poisoned set's or the teacher's)"),
    evaluate_teacher: bool = typer.Option(True, help="also record the teacher's ACC/ASR on the test set"),
    defense: str = typer.Option("none", help=DEFENSE_HELP, rich_help_panel=DEFENSE),
    sv_coefficient: float = typer.Option(0.1, help="sv/abd: weight of the vaccine's synthesis term (ood: of the "
                                         "push-away term)", rich_help_panel=DEFENSE),
    sv_copies: int = typer.Option(3, help="sv/abd: shuffled teacher copies in the suspect", rich_help_panel=DEFENSE),
    sv_layers: Optional[int] = typer.Option(None, help="sv/abd: last convolutions to shuffle (default: the "
                                            "teacher's last stage)", rich_help_panel=DEFENSE),
    sv_tail_test: bool = typer.Option(True, help="sv/abd: use the vaccine only if the tail-ratio test passes",
                                      rich_help_panel=DEFENSE),
    sv_transfer_action: str = typer.Option("push", help="sv/abd with ood: push the student away from the teacher "
                                           "on the transfer images the suspect agrees on (ABD's) or drop them",
                                           rich_help_panel=DEFENSE),
    sr_rounds: int = typer.Option(10, help="sr/abd: perturbation-search steps per student step",
                                  rich_help_panel=DEFENSE),
    sr_portion: float = typer.Option(0.02, help="sr/abd: share of the batch that carries the perturbation",
                                     rich_help_panel=DEFENSE),
    sr_start: float = typer.Option(0.0, help="sr/abd: share of the iterations before Self-Retrospection starts "
                                   "(e.g. 0.9: a final fine-tuning phase)", rich_help_panel=DEFENSE),
    sr_phase_lr: float = typer.Option(5e-4, min=0, help="sr/abd with --sr-start > 0: the student's learning rate "
                                      "when Self-Retrospection starts, cosine-decayed to 0 (ABD's fine-tuning "
                                      "phase); 0 keeps the run's own schedule", rich_help_panel=DEFENSE),
    sr_perturb_model: str = typer.Option("teacher", help="sr/abd: teacher | student, whose output the "
                                         "perturbation changes", rich_help_panel=DEFENSE),
    views: str = typer.Option("crop-flip,jpeg", help="robust-kd: what each view applies, in order, "
                              "comma-separated: noise, blur, jpeg, crop-flip", rich_help_panel=DEFENSE),
    num_views: int = typer.Option(8, min=1, help="robust-kd: views averaged per teacher target",
                                  rich_help_panel=DEFENSE),
    noise_sigma: str = typer.Option("8/255", help="robust-kd: Gaussian noise std, pixel units",
                                    rich_help_panel=DEFENSE),
    blur_sigma: float = typer.Option(0.75, help="robust-kd: Gaussian blur std in px", rich_help_panel=DEFENSE),
    jpeg_quality: int = typer.Option(30, help="robust-kd: JPEG quality 1..100", rich_help_panel=DEFENSE),
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    weight_decay: float = WEIGHT_DECAY,
    schedule: str = SCHEDULE,
    label_smoothing: float = LABEL_SMOOTHING,
    crop_padding: Optional[int] = CROP_PADDING,
    hflip: Optional[bool] = HFLIP,
    eval_every: int = EVAL_EVERY,
    compile_model: bool = COMPILE,
    seed: int = SEED,
    data_dir: Optional[Path] = DATA_DIR,
    resize: Optional[int] = RESIZE,
    device: str = DEVICE,
    resume: bool = RESUME,
    progress: bool = PROGRESS,
    deterministic: bool = DETERMINISTIC,
    iterations: int = typer.Option(2000, min=1, help="outer iterations", rich_help_panel=DATA_FREE),
    synthesis_steps: Optional[int] = typer.Option(
        None, min=1, help="optimisation steps per synthesis round (zskt/dfad 1, deepinversion 2000, cmi 200)",
        rich_help_panel=DATA_FREE),
    synthesis_batch_size: Optional[int] = typer.Option(
        None, min=2, help="images per synthesis round (zskt/dfad: --batch-size; deepinversion/cmi 256)",
        rich_help_panel=DATA_FREE),
    student_steps: Optional[int] = typer.Option(None, min=1, help="student steps per iteration (zskt 10, dfad 5, "
                                                "deepinversion/cmi 2000)", rich_help_panel=DATA_FREE),
    latent_dim: Optional[int] = typer.Option(None, min=1, help="generator latent size (zskt 100, dfad/cmi 256)",
                                             rich_help_panel=DATA_FREE),
    generator_output: str = typer.Option(
        "batchnorm", help="last layer of the zskt/dfad generator: batchnorm (as ZSKT and ABD; images made in the "
        "teacher's normalised space, then clipped to [0, 1]) or sigmoid", rich_help_panel=DATA_FREE),
    synthesis_lr: Optional[float] = typer.Option(None, help="Adam step of the generator (1e-3) or of the pixels "
                                                 "(deepinversion 0.05)", rich_help_panel=DATA_FREE),
    student_lr: Optional[float] = typer.Option(None, help="student step (zskt Adam 2e-3, others SGD 0.1)",
                                               rich_help_panel=DATA_FREE),
    max_grad_norm: Optional[float] = typer.Option(None, min=0, help="clip the gradient norm of each synthesis and "
                                                  "student step (zskt 5, as ZSKT's code; others 0: off)",
                                                  rich_help_panel=DATA_FREE),
    attention_beta: Optional[float] = typer.Option(None, help="attention-transfer weight β, in ZSKT's convention "
                                                   "(zskt 250; 0 leaves it out)",
                                                   rich_help_panel=DATA_FREE),
    bn_weight: Optional[float] = typer.Option(None, help="BatchNorm-statistics prior (deepinversion 10, cmi 1)",
                                              rich_help_panel=DATA_FREE),
    onehot_weight: Optional[float] = typer.Option(None, help="cross-entropy to the round's target classes "
                                                  "(deepinversion 1, cmi 0.5)", rich_help_panel=DATA_FREE),
    adv_weight: Optional[float] = typer.Option(None, help="disagreement term (cmi 0.5; > 0 makes deepinversion "
                                               "adaptive)", rich_help_panel=DATA_FREE),
    tv_weight: Optional[float] = typer.Option(None, help="total-variation prior (deepinversion 1e-3)",
                                              rich_help_panel=DATA_FREE),
    contrastive_weight: Optional[float] = typer.Option(None, help="InfoNCE term (cmi 0.8)", rich_help_panel=DATA_FREE),
    pool_size: int = typer.Option(50000, min=1, help="synthetic images kept (deepinversion, cmi)",
                                  rich_help_panel=DATA_FREE),
    save_samples: bool = typer.Option(False, help="write samples.png, a grid of the last synthetic images",
                                      rich_help_panel=DATA_FREE),
    checkpoint_every: Optional[int] = typer.Option(None, min=1, help="save the resumable state every N iterations "
                                                   "(zskt/dfad 50, deepinversion/cmi 1)",
                                                   rich_help_panel=DATA_FREE),
) -> None:
    """Distill a teacher into a student on a data set (clean, poisoned or out-of-distribution)
    or without data (zskt, dfad, deepinversion, cmi; see docs/data-free-kd.md).

    Loss: (1-λ)·CE(student, label) + λ·T²·KL(teacher_T ‖ student_T), batch mean. The student
    is evaluated for ACC, and for ASR with the trigger recorded in a poisoned set's manifest
    or in a backdoored teacher's checkpoint; with restricted source classes also for the
    trigger's false-positive rate on the others. Without augmentation (--crop-padding 0
    --no-hflip) the teacher's logits are computed once.
    """
    from kdbackdoor.data.poisoned_set import is_poisoned_set, load_poisoned_set
    from kdbackdoor.distill.dataset_kd import distill
    from kdbackdoor.distill.data_free_config import DataFreeConfig
    from kdbackdoor.distill.losses import KDConfig
    from kdbackdoor.runtime import select_device

    defense_settings = {
        "robust": lambda: _robust_config(views, num_views, noise_sigma, blur_sigma, jpeg_quality, seed),
        "vaccine": lambda: validated(
            ShufflingVaccineConfig, {f: f"--sv-{f.replace('_', '-')}" for f in ShufflingVaccineConfig.model_fields},
            coefficient=sv_coefficient, copies=sv_copies, layers=sv_layers, tail_test=sv_tail_test, seed=seed,
            **({} if method in DATA_FREE_METHODS else {"transfer_action": sv_transfer_action})),
        "retrospection": lambda: validated(
            SelfRetrospectionConfig, {f: f"--sr-{f.replace('_', '-')}" for f in SelfRetrospectionConfig.model_fields},
            rounds=sr_rounds, portion=sr_portion, start=sr_start, phase_lr=sr_phase_lr or None,
            perturb_model=sr_perturb_model, seed=seed),
    }
    chosen_defense = _defense(defense, method, defense_settings)
    if method in DATA_FREE_METHODS:
        data_free_config = validated(
            DataFreeConfig, method=method, iterations=iterations, batch_size=batch_size,
            synthesis_batch_size=synthesis_batch_size, synthesis_steps=synthesis_steps, synthesis_lr=synthesis_lr,
            latent_dim=latent_dim, generator_output=generator_output, student_lr=student_lr,
            student_steps=student_steps, temperature=temperature, max_grad_norm=max_grad_norm,
            attention_beta=attention_beta, bn_weight=bn_weight, onehot_weight=onehot_weight, adv_weight=adv_weight,
            tv_weight=tv_weight, contrastive_weight=contrastive_weight, pool_size=pool_size,
            save_samples=save_samples, eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed)
        start_run(out, resume, deterministic)
        _distill_data_free(teacher, model_source(arch, num_classes, input_size, mean, std), student_arch,
                           data_free_config, chosen_defense, test_data, data_dir, resize, trigger, target,
                           evaluate_teacher, out, device, resume, progress)
        return
    if method not in ("dataset", "ood"):
        raise KDBackdoorError(f"unknown --method {method!r}; use dataset, ood, {', '.join(DATA_FREE_METHODS)}")
    if method == "ood" and kd_lambda not in (None, 1.0):
        raise KDBackdoorError("--method ood distils on images whose labels mean nothing to the teacher: "
                              "it needs --kd-lambda 1")
    config = train_config(epochs, batch_size, lr, weight_decay, schedule, label_smoothing, crop_padding, hflip,
                          eval_every, seed, cutmix, compile_model, dataset=data, resize=resize)
    kd = validated(KDConfig, kd_lambda=kd_lambda if kd_lambda is not None else (1.0 if method == "ood" else 0.5),
                   temperature=4.0 if temperature is None else temperature)
    dev = select_device(device)
    start_run(out, resume, deterministic)
    model, sidecar = load_teacher(teacher, dev, model_source(arch, num_classes, input_size, mean, std))
    teacher_meta = sidecar.get("metadata") or {}
    manifest = None
    if is_poisoned_set(data):
        train, manifest = load_poisoned_set(data)
        record_dataset = manifest["dataset"]
    else:
        train = load_data(data, "train", data_dir, resize, progress)
        record_dataset = dataset_record(data, data_dir, resize)
    if test_data is not None:
        test_record = dataset_record(test_data, data_dir, resize)
    elif method == "ood":
        test_record = _teacher_dataset(teacher, teacher_meta)
    else:
        test_record = record_dataset
    test = load_data(test_record["spec"], "test", optional_path(test_record.get("data_dir")),
                     test_record.get("resize"), progress)
    backdoor = _distill_backdoor(trigger, target, manifest, teacher_meta.get("backdoor"), train.image_shape, seed)
    has_poisons = manifest is not None and bool(train.provenance.poisoned.any())
    use_baseline = has_poisons if baseline is None else baseline
    if use_baseline and manifest is None:
        raise KDBackdoorError("--baseline needs a poisoned set (from poison-distill) as --dataset")
    metadata = {"method": method, "dataset": test_record, "transfer_set": record_dataset,
                "teacher": {"path": str(teacher), "weights_sha256": sidecar.get("weights_sha256")},
                "poisoned_set": _poisoned_set_summary(data, manifest) if manifest else None}
    _, record = distill(model, train, test, student_arch, config, kd, out, device=dev, backdoor=backdoor,
                        baseline=use_baseline, evaluate_teacher=evaluate_teacher, resume=resume,
                        progress=progress, metadata=metadata, defense=chosen_defense)
    console.print(run_summary(record))
    console.print(f"→ {out / 'model.safetensors'}")


def _teacher_dataset(path: Path, teacher_meta: dict) -> dict:
    if not teacher_meta.get("dataset"):
        raise KDBackdoorError(f"{path}: the checkpoint records no data set; pass --test-dataset")
    return teacher_meta["dataset"]


def _distill_data_free(teacher, source, student_arch, config, defense, test_data, data_dir, resize, trigger, target,
                       evaluate_teacher, out, device, resume, progress) -> None:
    """`distill` with a data-free method: no training data; tested on --test-dataset or the teacher's data set."""
    from kdbackdoor.distill.data_free import distill_data_free
    from kdbackdoor.runtime import select_device
    dev = select_device(device)
    model, sidecar = load_teacher(teacher, dev, source)
    teacher_meta = sidecar.get("metadata") or {}
    test_record = dataset_record(test_data, data_dir, resize) if test_data else _teacher_dataset(teacher, teacher_meta)
    test = load_data(test_record["spec"], "test", optional_path(test_record.get("data_dir")),
                     test_record.get("resize"), progress)
    backdoor = _distill_backdoor(trigger, target, None, teacher_meta.get("backdoor"), test.image_shape, config.seed)
    metadata = {"dataset": test_record,
                "teacher": {"path": str(teacher), "weights_sha256": sidecar.get("weights_sha256")}}
    _, record = distill_data_free(model, test, student_arch, config, out, device=dev, backdoor=backdoor,
                                  defense=defense, evaluate_teacher=evaluate_teacher, resume=resume, progress=progress,
                                  metadata=metadata)
    console.print(run_summary(record))
    console.print(f"→ {out / 'model.safetensors'}")


def _defense(name: str, method: str, settings: dict[str, Callable[[], BaseModel]]):
    """The defense ``--defense`` names, checked against ``--method`` (the one place that does), made
    from the settings it reads (each validated only when read; a setting without options here
    takes its defaults); None for none."""
    if name not in DEFENSES:
        raise KDBackdoorError(f"unknown --defense {name!r}; use {' | '.join(DEFENSES)}")
    if DEFENSES[name].after_distillation:
        raise KDBackdoorError(f"--defense {name} acts on the distilled student afterwards; run it as an experiment "
                              f"(`kdbackdoor run CONFIG distill.defense={name}`)")
    methods = DEFENSES[name].methods
    if method in DEFENSES["none"].methods and method not in methods:
        raise KDBackdoorError(f"--defense {name} works with --method {' | '.join(methods)}, not {method!r}")
    made = {key: settings[key]() for key in DEFENSES[name].settings if key in settings}
    return build_defense(name, method if method in methods else None, **made)


def _robust_config(views, num_views, noise_sigma, blur_sigma, jpeg_quality, seed) -> RobustKDConfig:
    view_config = validated(ViewConfig, kinds=parse_kinds(views), noise_sigma=pixel_value(noise_sigma, "--noise-sigma"),
                            blur_sigma=blur_sigma, jpeg_quality=jpeg_quality)
    return validated(RobustKDConfig, views=view_config, num_views=num_views, seed=seed)


def _distill_backdoor(trigger, target, manifest, teacher_backdoor, image_shape, seed):
    """The backdoor a student is checked for: --trigger/--target, else the poisoned set's, else
    the teacher's recorded one, else none."""
    from kdbackdoor.distill.record import Backdoor
    from kdbackdoor.triggers import build_trigger
    if trigger is not None:
        recorded = (manifest or {}).get("target", (teacher_backdoor or {}).get("target"))
        if target is None and recorded is None:
            raise KDBackdoorError("--trigger given without --target")
        return Backdoor(make_trigger(trigger, image_shape, seed), target if target is not None else recorded)
    if manifest is not None and manifest.get("trigger"):
        return Backdoor(build_trigger(manifest["trigger"]), target if target is not None else manifest["target"],
                        manifest["config"].get("source_classes"))
    if teacher_backdoor and teacher_backdoor.get("trigger"):
        return Backdoor(build_trigger(teacher_backdoor["trigger"]),
                        target if target is not None else teacher_backdoor["target"])
    if target is not None:
        raise KDBackdoorError("--target given without --trigger (neither the data nor the teacher records one)")
    return None


def _poisoned_set_summary(path: str, manifest: dict) -> dict:
    """What a student's record keeps of the poisoned set it was distilled on."""
    keys = ("data_sha256", "teacher", "trigger", "target", "engine", "config", "counts", "teacher_stability",
            "perturbation", "source_classes")
    return {"path": str(path), **{key: manifest.get(key) for key in keys}}

"""The ``kdbackdoor`` command line. Each command is a thin layer over the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kdbackdoor.attacks.engines import describe_engines
from kdbackdoor.attacks.teacher_poisoning import RATE_HELP
from kdbackdoor.distill.data_free import METHODS as DATA_FREE_METHODS
from kdbackdoor.distill.dataset_kd import defense_parts
from kdbackdoor.errors import KDBackdoorError

app = typer.Typer(
    help="Attack, defend and audit knowledge distillation against backdoors.\n\n"
    "Images are pixel-space [0,1] tensors; data sets are loaded once into memory as uint8.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    rich_markup_mode="markdown",  # docstrings rewrap to the terminal instead of keeping their line breaks
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # errors stay on one line

DATASET_HELP = ("data set: digits (embedded, no download), cifar10, cifar100 (downloaded with checksum "
                "or read from --data-dir), gtsrb (official layout in --data-dir), imagefolder:PATH, npz:PATH")
DEVICE_HELP = "auto (the machine's accelerator, e.g. CUDA, when present), cpu, or that accelerator: cuda, cuda:N, ..."
DEFENSE = "Defense (--defense)"
DATA_FREE = "Data-free (--method zskt | dfad | deepinversion | cmi)"

# Options shared by every command that trains a model (one definition, the same defaults).
EPOCHS = typer.Option(30, min=1)
BATCH_SIZE = typer.Option(128, min=1)
LR = typer.Option(0.1, help="peak learning rate (SGD, Nesterov momentum 0.9)")
WEIGHT_DECAY = typer.Option(5e-4)
SCHEDULE = typer.Option("onecycle", help="onecycle (linear warm-up then decay) | cosine | step | constant")
LABEL_SMOOTHING = typer.Option(0.0)
CROP_PADDING = typer.Option(4, help="random-crop padding in px (0 disables)")
HFLIP = typer.Option(True, help="random horizontal flips")
EVAL_EVERY = typer.Option(1, help="test accuracy every N epochs (0: at the end only)")
COMPILE = typer.Option(False, "--compile", help="torch.compile the model for training: faster steps after "
                       "minutes of compilation; for long runs, above all on CUDA")
SEED = typer.Option(0)
DATA_DIR = typer.Option(None, help="where cifar/gtsrb files are (else the cache/download)")
RESIZE = typer.Option(None, help="resize images to this many px (square)")
DEVICE = typer.Option("auto", help=DEVICE_HELP)
RESUME = typer.Option(False, help="continue an interrupted run in --out")
PROGRESS = typer.Option(True, help="show progress bars")
DETERMINISTIC = typer.Option(False, help="use only deterministic kernels (torch.use_deterministic_algorithms; "
                             "fixes the cuBLAS workspace): identical numbers on CUDA too, somewhat slower")


def _load(spec: str, split: str, data_dir: Optional[Path], resize: Optional[int], progress: bool = True):
    from kdbackdoor.data.sources import load_dataset
    return load_dataset(spec, split, data_dir=data_dir, resize=resize, progress=progress)


def dataset_record(spec: str, data_dir: Optional[Path], resize: Optional[int]) -> dict:
    """How to load the data set again (stored in checkpoints so `evaluate` can default to it)."""
    return {"spec": spec, "data_dir": str(data_dir) if data_dir else None, "resize": resize}


@app.command("train-teacher")
def train_teacher_cmd(
    dataset: str = typer.Option("digits", help=DATASET_HELP),
    arch: str = typer.Option("small-cnn", help="architecture (see `kdbackdoor models`)"),
    out: Path = typer.Option(..., help="output folder: model.safetensors + model.json, metrics.json, train_state.pt"),
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    weight_decay: float = WEIGHT_DECAY,
    schedule: str = SCHEDULE,
    label_smoothing: float = LABEL_SMOOTHING,
    crop_padding: int = CROP_PADDING,
    hflip: bool = HFLIP,
    eval_every: int = EVAL_EVERY,
    compile_model: bool = COMPILE,
    seed: int = SEED,
    data_dir: Optional[Path] = DATA_DIR,
    resize: Optional[int] = RESIZE,
    device: str = DEVICE,
    resume: bool = RESUME,
    progress: bool = PROGRESS,
    deterministic: bool = DETERMINISTIC,
    backdoor: Optional[str] = typer.Option(None, help="trigger spec to plant (see `kdbackdoor triggers list`); "
                                           "none trains a clean teacher"),
    target: int = typer.Option(0, help="backdoor target class (all-to-one)"),
    poison_rate: float = typer.Option(0.1, help=RATE_HELP),
    poison_mode: str = typer.Option("replace", help="replace | add (see --poison-rate)"),
    poison_style: str = typer.Option("auto", help="dirty (relabel non-target images) | clean (poison target-class "
                                     "images, labels kept) | auto (clean for sig and clean-label)"),
    adv_model: Optional[Path] = typer.Option(None, help="clean model for the clean-label trigger's PGD step"),
    adv_eps: float = typer.Option(16 / 255, help="clean-label PGD radius, L∞ in pixel units"),
    holdout: float = typer.Option(0.0, help="share of the training set reserved as clean holdout (not trained on)"),
) -> None:
    """Train a teacher, clean or backdoored; weights as safetensors with a JSON sidecar.

    With --backdoor, a seeded draw of images gets the trigger (all-to-one) before training;
    the trigger's full definition, the rate and its meaning go into the sidecar, and every
    training sample's provenance into provenance.npz.
    """
    from kdbackdoor.attacks.teacher_poisoning import PoisonConfig
    from kdbackdoor.runtime import select_device
    from kdbackdoor.teacher import train_teacher

    config = _train_config(epochs, batch_size, lr, weight_decay, schedule, label_smoothing, crop_padding, hflip,
                           eval_every, seed, compile_model=compile_model)
    poison = _validated(PoisonConfig, {"rate": "--poison-rate", "mode": "--poison-mode", "style": "--poison-style"},
                        target=target, rate=poison_rate, mode=poison_mode, style=poison_style, adv_eps=adv_eps,
                        seed=seed)
    dev = select_device(device)
    _start_run(out, resume, deterministic)
    train = _load(dataset, "train", data_dir, resize, progress)
    test = _load(dataset, "test", data_dir, resize, progress)
    trigger = _trigger(backdoor, train.image_shape, seed) if backdoor else None
    adversary = _load_model(adv_model, dev, train) if adv_model else None
    _, record = train_teacher(train, test, arch, config, out, device=dev, resume=resume, progress=progress,
                              metadata={"dataset": dataset_record(dataset, data_dir, resize)},
                              trigger=trigger, poison=poison if trigger else None, holdout=holdout,
                              adversary=adversary)
    metrics = record["metrics"]
    asr = f", ASR {metrics['asr']:.2%}" if "asr" in metrics else ""
    console.print(f"test accuracy {metrics['acc']:.2%}{asr}  →  {out / 'model.safetensors'}")


@app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Option(..., help="checkpoint: .safetensors (+ .json sidecar), its folder, or a .pt state dict"),
    dataset: Optional[str] = typer.Option(None, help=DATASET_HELP + " (default: the checkpoint's data set)"),
    split: str = typer.Option("test"),
    data_dir: Optional[Path] = typer.Option(None),
    resize: Optional[int] = typer.Option(None),
    out: Optional[Path] = typer.Option(None, help="JSON file for the results (default: evaluation.json beside the model)"),
    batch_size: int = typer.Option(512, min=1),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    trigger: Optional[str] = typer.Option(None, help="trigger spec for ASR (default: the checkpoint's backdoor, if any)"),
    target: Optional[int] = typer.Option(None, help="ASR target class (default: the checkpoint's)"),
) -> None:
    """ACC overall and per class, and ASR with per-source-class ASR when a trigger is known.

    ASR = share of test images whose true label differs from the target that the model
    assigns to the target once the trigger is applied; beside it, the share of the same images
    it assigns to the target without the trigger.
    """
    from kdbackdoor.atomic import write_json
    from kdbackdoor.evaluate import model_metrics
    from kdbackdoor.models import load_checkpoint
    from kdbackdoor.runtime import select_device
    from kdbackdoor.triggers import build_trigger

    dev = select_device(device)
    net, sidecar = load_checkpoint(model, device=dev)
    meta = sidecar.get("metadata") or {}
    recorded = meta.get("dataset") or {}
    if dataset is None:
        if not recorded.get("spec"):
            raise KDBackdoorError(f"{model}: the checkpoint records no data set; pass --dataset")
        dataset = recorded["spec"]
        data_dir = data_dir or (Path(recorded["data_dir"]) if recorded.get("data_dir") else None)
        resize = resize or recorded.get("resize")
    data = _load(dataset, split, data_dir, resize)
    backdoor = meta.get("backdoor") or {}
    trig = _trigger(trigger, data.image_shape, 0) if trigger else (
        build_trigger(backdoor["trigger"]) if backdoor.get("trigger") else None)
    target = target if target is not None else backdoor.get("target")
    if trig is not None and target is None:
        raise KDBackdoorError("--trigger given without --target (the checkpoint records no target)")
    metrics = model_metrics(net, data, trigger=trig, target=target, device=dev, batch_size=batch_size)
    result = {"model": str(model), "dataset": dataset, "split": split, "acc": metrics["acc"],
              "per_class": metrics["per_class_acc"], "n": len(data)}
    if trig is not None:
        result["backdoor"] = {"trigger": trig.config(), "target": target, "asr": metrics["asr"],
                              "per_source_class_asr": metrics["per_source_class_asr"],
                              "n": int((data.labels != target).sum()),
                              "target_without_trigger": metrics["target_without_trigger"]}
    out = out or _model_dir(model) / "evaluation.json"
    write_json(out, result)
    console.print(_evaluation_table(result, f"{model} on {dataset}:{split}"))
    recorded = _run_summary(meta, student=False) if "teacher" in meta else ""  # a distilled student
    if recorded:
        console.print("recorded when distilled:\n" + recorded)
    console.print(f"written to {out}")


@app.command("poison-distill")
def poison_distill_cmd(
    teacher: Path = typer.Option(..., help="the clean teacher the distillation will use (checkpoint or its folder)"),
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
                                    "(repeatable); see the list below"),
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
    config = _validated(DistillPoisonConfig, target=target, rate=rate, mode=mode,
                        source_classes=_int_list(source_classes, "--source-classes"), label_mode=label_mode,
                        threshold=threshold, retries=retries, seed=seed, batch_size=batch_size,
                        early_exit=early_exit)
    engine_params = _engine_params(method, eps, step_size, steps, norm, param)
    dev = select_device(device)
    gen_model = load_generator(generator, dev) if generator is not None else None
    engine = build_engine(method, generator_model=gen_model, **engine_params)  # checks the options before any work
    check_engine(engine, config)
    _start_run(out, resume, deterministic)
    model, sidecar = _load_teacher(teacher, dev)
    data = _load(dataset, split, data_dir, resize, progress)
    if subset is not None and subset < len(data):
        import torch
        rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:subset].sort()[0]
        data = data.subset(rows, name=f"{data.name}[subset {subset}]")
    trig = _trigger(trigger, data.image_shape, seed)
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


@app.command("distill")
def distill_cmd(
    teacher: Path = typer.Option(..., help="teacher checkpoint (or its folder)"),
    out: Path = typer.Option(..., help="output folder: model.safetensors + model.json, metrics.json, baseline/"),
    data: str = typer.Option("digits", help="distillation data: a poisoned-set folder (from poison-distill) "
                             "or a " + DATASET_HELP),
    student_arch: str = typer.Option("small-cnn", help="student architecture (see `kdbackdoor models`)"),
    method: str = typer.Option("dataset", help="dataset: distil on --data with its labels; ood: distil on images "
                               "of another data set (labels unused, KL only, any classes), evaluated on the "
                               "teacher's own data set; data-free (--data unused): zskt, dfad (adversarial "
                               "generator), deepinversion (images optimised against the teacher's BatchNorm "
                               "statistics), cmi (contrastive model inversion)"),
    kd_lambda: Optional[float] = typer.Option(None, help="λ in (1-λ)·CE(student, label) + λ·T²·KL(teacher_T ‖ "
                                              "student_T); 0 = labels only, 1 = KL only (default 0.5; ood: 1)"),
    cutmix: float = typer.Option(0.0, help="CutMix probability per image (KL only, e.g. with ood)"),
    temperature: Optional[float] = typer.Option(None, help="softmax temperature T (dataset/ood 4; zskt/dfad 1, "
                                                "deepinversion/cmi 20)"),
    test_data: Optional[str] = typer.Option(None, help="test data set (default: the test split of the "
                                            "distillation data's source; for ood the teacher's data set)"),
    baseline: Optional[bool] = typer.Option(None, help="also distill a student on the same data without its "
                                            "poisons, for comparison (doubles the time; default: on for "
                                            "poisoned sets)"),
    trigger: Optional[str] = typer.Option(None, help="trigger spec for ASR (default: the poisoned set's, else the "
                                          "teacher's recorded backdoor)"),
    target: Optional[int] = typer.Option(None, help="ASR target (default: the poisoned set's or the teacher's)"),
    evaluate_teacher: bool = typer.Option(True, help="also record the teacher's ACC/ASR on the test set"),
    defense: str = typer.Option("none", help="none | robust-kd (dataset/ood: teacher targets averaged over "
                                "random views of each image, see docs/defenses-data.md) | abd | sv | sr (data-free and "
                                "ood: ABD's Shuffling Vaccine and/or Self-Retrospection; for ood the student is "
                                "pushed away from the teacher on backdoor-like transfer images; see docs/abd.md)",
                                rich_help_panel=DEFENSE),
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
    crop_padding: int = CROP_PADDING,
    hflip: bool = HFLIP,
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
    from kdbackdoor.distill.data_free import DataFreeConfig
    from kdbackdoor.distill.losses import KDConfig
    from kdbackdoor.runtime import select_device

    robust = _distill_defense(defense, method, views, num_views, noise_sigma, blur_sigma, jpeg_quality, seed)
    if method in DATA_FREE_METHODS:
        data_free_config = _validated(
            DataFreeConfig, method=method, iterations=iterations, batch_size=batch_size,
            synthesis_batch_size=synthesis_batch_size, synthesis_steps=synthesis_steps, synthesis_lr=synthesis_lr,
            latent_dim=latent_dim, generator_output=generator_output, student_lr=student_lr,
            student_steps=student_steps, temperature=temperature, max_grad_norm=max_grad_norm,
            attention_beta=attention_beta, bn_weight=bn_weight, onehot_weight=onehot_weight, adv_weight=adv_weight,
            tv_weight=tv_weight, contrastive_weight=contrastive_weight, pool_size=pool_size,
            save_samples=save_samples, eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed)
        _start_run(out, resume, deterministic)
        data_free_defense = _data_free_defense(defense, sv_coefficient, sv_copies, sv_layers, sv_tail_test, sr_rounds,
                                               sr_portion, sr_start, sr_phase_lr, sr_perturb_model, seed)
        _distill_data_free(teacher, student_arch, data_free_config, data_free_defense, test_data, data_dir, resize,
                           trigger, target, evaluate_teacher, out, device, resume, progress)
        return
    if method not in ("dataset", "ood"):
        raise KDBackdoorError(f"unknown --method {method!r}; use dataset, ood, {', '.join(DATA_FREE_METHODS)}")
    if method == "ood" and kd_lambda not in (None, 1.0):
        raise KDBackdoorError("--method ood distils on images whose labels mean nothing to the teacher: "
                              "it needs --kd-lambda 1")
    config = _train_config(epochs, batch_size, lr, weight_decay, schedule, label_smoothing, crop_padding, hflip,
                           eval_every, seed, cutmix, compile_model)
    kd = _validated(KDConfig, kd_lambda=kd_lambda if kd_lambda is not None else (1.0 if method == "ood" else 0.5),
                    temperature=4.0 if temperature is None else temperature)
    from kdbackdoor.defenses.abd import abd_halves
    uses_vaccine, uses_retrospection = abd_halves(defense)
    vaccine = (_vaccine_config(sv_coefficient, sv_copies, sv_layers, sv_tail_test, seed,
                               transfer_action=sv_transfer_action) if uses_vaccine else None)
    retrospection = (_retrospection_config(sr_rounds, sr_portion, sr_start, sr_phase_lr, sr_perturb_model, seed)
                     if uses_retrospection else None)
    dev = select_device(device)
    _start_run(out, resume, deterministic)
    model, sidecar = _load_teacher(teacher, dev)
    teacher_meta = sidecar.get("metadata") or {}
    manifest = None
    if is_poisoned_set(data):
        train, manifest = load_poisoned_set(data)
        record_dataset = manifest["dataset"]
    else:
        train = _load(data, "train", data_dir, resize, progress)
        record_dataset = dataset_record(data, data_dir, resize)
    if test_data is not None:
        test_record = dataset_record(test_data, data_dir, resize)
    elif method == "ood":
        test_record = _teacher_dataset(teacher, teacher_meta)
    else:
        test_record = record_dataset
    test = _load(test_record["spec"], "test", _optional_path(test_record.get("data_dir")),
                 test_record.get("resize"), progress)
    backdoor = _distill_backdoor(trigger, target, manifest, teacher_meta.get("backdoor"), train.image_shape, seed)
    has_poisons = manifest is not None and bool(train.provenance.poisoned.any())
    use_baseline = has_poisons if baseline is None else baseline
    if use_baseline and manifest is None:
        raise KDBackdoorError("--baseline needs a poisoned set (from poison-distill) as --data")
    metadata = {"method": method, "dataset": test_record, "transfer_set": record_dataset,
                "teacher": {"path": str(teacher), "weights_sha256": sidecar.get("weights_sha256")},
                "poisoned_set": _poisoned_set_summary(data, manifest) if manifest else None}
    _, record = distill(model, train, test, student_arch, config, kd, out, device=dev, backdoor=backdoor,
                        baseline=use_baseline, evaluate_teacher=evaluate_teacher, resume=resume,
                        progress=progress, metadata=metadata, robust=robust, vaccine=vaccine,
                        retrospection=retrospection)
    console.print(_run_summary(record))
    console.print(f"→ {out / 'model.safetensors'}")


poison_distill_cmd.__doc__ = poison_distill_cmd.__doc__.replace(  # a markdown list in --help
    "ENGINES", "\n    ".join(f"- {line}" for line in describe_engines().splitlines()))


@app.command("audit-data")
def audit_data_cmd(
    teacher: Path = typer.Option(..., help="the teacher the set will be distilled from (checkpoint or its folder)"),
    data: str = typer.Option(..., help="the distillation set: a poisoned-set folder (from poison-distill) or a "
                             + DATASET_HELP),
    out: Path = typer.Option(..., help="new folder: scores.csv, audit.json (and cleaned/ with --remove)"),
    filters: str = typer.Option("all", help="comma-separated filters, or all (reference-model only with "
                                "--reference); see the list below"),
    reference: Optional[Path] = typer.Option(None, help="a second model for the reference-model filter"),
    expected_rate: Optional[float] = typer.Option(None, help="flag this share of the set (the highest scores) "
                                                  "with every filter, instead of each filter's own rule"),
    remove: bool = typer.Option(False, help="also write OUT/cleaned: the set without every sample any filter "
                                "flagged (poisoned-set format, for `distill --data`)"),
    param: list[str] = typer.Option([], "--param", "-p", help="a filter parameter as FILTER.KEY=VALUE "
                                    "(repeatable), e.g. brittleness.noise_sigma=16/255, strip.blends=8"),
    split: str = typer.Option("train", help="split of a data-set spec"),
    data_dir: Optional[Path] = DATA_DIR,
    resize: Optional[int] = RESIZE,
    seed: int = SEED,
    batch_size: int = typer.Option(256, min=1, help="images per forward pass"),
    device: str = DEVICE,
    progress: bool = PROGRESS,
) -> None:
    """Score every sample of a distillation set for being a poison and flag suspects.

    Each filter gives a score (higher = more suspicious) and flags from its own rule or
    --expected-rate; decisions never read the set's provenance. When the set has provenance
    (a poisoned set), audit.json also scores each filter against it: AUROC, TPR at 5% FPR,
    precision, recall. Writes scores.csv (a row per sample) and audit.json; prints a table.

    FILTERS
    """
    from kdbackdoor.data.poisoned_set import is_poisoned_set, load_poisoned_set
    from kdbackdoor.defenses import audit
    from kdbackdoor.defenses.filters import AuditContext, available_filters, build_filter
    from kdbackdoor.runtime import select_device

    if (out / audit.AUDIT_FILE).exists():
        raise KDBackdoorError(f"{out} already holds an audit; choose another --out or delete it first")
    names = list(available_filters()) if filters == "all" else [n.strip() for n in filters.split(",") if n.strip()]
    if filters == "all" and reference is None:
        names.remove("reference-model")
    if "reference-model" in names and reference is None:
        raise KDBackdoorError("filter reference-model needs --reference (a second model's checkpoint)")
    params = _filter_params(param, names)
    chosen = [build_filter(name, **params.get(name, {})) for name in names]
    if not chosen:
        raise KDBackdoorError(f"--filters {filters!r} names no filter; available: {', '.join(available_filters())}")
    dev = select_device(device)
    model, sidecar = _load_teacher(teacher, dev)
    if is_poisoned_set(data):
        dataset, manifest = load_poisoned_set(data)
    else:
        dataset = _load(data, split, data_dir, resize, progress)
        manifest = {"dataset": {**dataset_record(data, data_dir, resize), "split": split}}
    ref_model = _load_model(reference, dev, dataset) if reference is not None else None
    context = AuditContext(model, dev, ref_model, seed, batch_size)
    results = audit.run_filters(dataset, context, chosen, expected_rate=expected_rate, progress=progress)
    report = {"teacher": {"path": str(teacher), "weights_sha256": sidecar.get("weights_sha256")},
              "reference": str(reference) if reference else None, "data": str(data), "size": len(dataset),
              "provenance": dataset.provenance is not None, "expected_rate": expected_rate, "seed": seed,
              "filters": audit.audit_report(dataset, results)}
    out.mkdir(parents=True, exist_ok=True)
    audit.write_scores(out / audit.SCORES_FILE, dataset, results)
    if remove:
        cleaned, removal = audit.remove_flagged(dataset, results)
        report["removal"] = {key: value for key, value in removal.items() if key != "removed_rows"}
        if dataset.provenance is not None:
            report["removal"]["poisons_left"] = int(cleaned.provenance.poisoned.sum())
        audit.save_cleaned(cleaned, out / audit.CLEANED_DIR, manifest, {**removal, "from": str(data)})
    audit.write_audit(out, report)
    console.print(_audit_table(report))
    if remove:
        console.print(f"removed {report['removal']['removed']} of {len(dataset)} samples → {out / audit.CLEANED_DIR}")
    console.print(f"→ {out / audit.AUDIT_FILE}, {out / audit.SCORES_FILE}")


def _describe_filters() -> str:
    from kdbackdoor.defenses.filters import available_filters
    return "\n    ".join(f"- {name}: {text}" for name, text in available_filters().items())  # markdown list


audit_data_cmd.__doc__ = audit_data_cmd.__doc__.replace("FILTERS", _describe_filters())


def _filter_params(items: list[str], names: list[str]) -> dict[str, dict]:
    """``FILTER.KEY=VALUE`` items as ``{filter: {key: value}}``; a value with commas becomes a list,
    a fraction like 16/255 a number."""
    params: dict[str, dict] = {}
    for item in items:
        target, sep, value = item.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise KDBackdoorError(f"--param: expected FILTER.KEY=VALUE, got {item!r}")
        if name not in names:
            raise KDBackdoorError(f"--param {item!r}: filter {name!r} is not among --filters ({', '.join(names)})")
        parsed = value.split(",") if "," in value else _pixel_value(value, f"--param {target}") if "/" in value else value
        params.setdefault(name, {})[key.replace("-", "_")] = parsed
    return params


def _audit_table(report: dict) -> Table:
    table = Table(title=f"audit of {report['data']} ({report['size']} samples)")
    columns = ["filter", "flagged"] + (["AUROC", "TPR@5%FPR", "precision", "recall"] if report["provenance"] else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "filter" else "right", no_wrap=column == "filter")

    def share(value):
        return "n/a" if value is None else f"{value:.3f}"

    for name, entry in report["filters"].items():
        cells = [name, str(entry["flagged"])]
        if "detection" in entry:
            d = entry["detection"]
            cells += [share(d["auroc"]), share(d["tpr_at_5fpr"]), share(d["precision"]), share(d["recall"])]
        table.add_row(*cells)
    return table


@app.command("scan")
def scan_cmd(
    model: Path = typer.Option(..., help="the model to scan (student or teacher): checkpoint or its folder"),
    data: str = typer.Option(..., help="clean images to scan with (labels used, provenance never): " + DATASET_HELP),
    split: str = typer.Option("test"),
    subset: int = typer.Option(1000, min=0, help="scan a seeded subset of this many images (0: all)"),
    steps: int = typer.Option(300, min=1, help="Neural Cleanse optimisation steps (each: one batch, every class)"),
    batch_size: int = typer.Option(16, min=1, help="clean images per step; the model sees classes × this many"),
    lr: float = typer.Option(0.1, help="Adam step on the mask and pattern logits"),
    init_cost: float = typer.Option(1e-3, help="mask-L1 weight set once a class's trigger first succeeds"),
    success_threshold: float = typer.Option(0.99, help="share of stamped images a trigger must send to its class"),
    anomaly_threshold: float = typer.Option(2.0, help="flag a below-median class whose anomaly index exceeds this"),
    trigger: Optional[str] = typer.Option(None, help="known trigger spec, for an audit: STRIP entropies of triggered "
                                          "images and the detection AUROC (the scan itself does not use it)"),
    strip_blends: int = typer.Option(16, min=1, help="STRIP: blends per image"),
    strip_alpha: float = typer.Option(0.5, help="STRIP: weight of the scanned image in each blend, in [0, 1]"),
    out: Optional[Path] = typer.Option(None, help="new folder for scan.json, triggers.png, suspected-trigger.png, "
                                       "recovered-triggers.npz, strip-entropy.csv (default: scan/ beside the model)"),
    data_dir: Optional[Path] = DATA_DIR,
    resize: Optional[int] = RESIZE,
    seed: int = SEED,
    device: str = DEVICE,
    progress: bool = PROGRESS,
) -> None:
    """Scan a model for a backdoor: Neural Cleanse trigger reverse-engineering and STRIP.

    For every class, the smallest mask m (H×W) and pattern p (pixels) are sought such that
    (1−m)·x + m·p sends clean images of other classes to that class. A backdoor target needs
    a far smaller mask than the others: a class whose mask L1 norm lies below the median with
    an anomaly index |norm − median| / (1.4826·MAD) above --anomaly-threshold is flagged.

    STRIP: every scan image is blended with others; the mean prediction entropy (nats) of
    clean images and the threshold that rejects 1% of them are reported (inputs below it are
    suspicious at inference). With --trigger, also the entropies of triggered images, the
    detection AUROC and the share caught at that threshold.
    """
    import time

    import torch
    from kdbackdoor.defenses.neural_cleanse import NeuralCleanseConfig
    from kdbackdoor.defenses.scan import SCAN_FILE, scan_model, write_scan
    from kdbackdoor.runtime import select_device

    out = out or _model_dir(model) / "scan"
    if (out / SCAN_FILE).exists():
        raise KDBackdoorError(f"{out} already holds a scan; choose another --out or delete it first")
    config = _validated(NeuralCleanseConfig, steps=steps, batch_size=batch_size, lr=lr, init_cost=init_cost,
                        success_threshold=success_threshold, anomaly_threshold=anomaly_threshold, seed=seed)
    dev = select_device(device)
    dataset = _load(data, split, data_dir, resize, progress)
    if subset and subset < len(dataset):
        rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:subset].sort()[0]
        dataset = dataset.subset(rows, name=f"{dataset.name}[subset {subset}]")
    net = _load_model(model, dev, dataset)
    trig = _trigger(trigger, dataset.image_shape, seed) if trigger else None
    started = time.perf_counter()
    report = scan_model(net, dataset, config, trigger=trig, strip_blends=strip_blends, strip_alpha=strip_alpha,
                        device=dev, progress=progress)
    record = {"model": str(model), "data": {**dataset_record(data, data_dir, resize), "split": split,
                                            "subset": subset or None, "images": len(dataset)},
              "seconds": round(time.perf_counter() - started, 1)}
    path = write_scan(report, out, record)
    console.print(_scan_table(report, f"Neural Cleanse on {model} ({len(dataset)} {data}:{split} images)"))
    cleanse, strip = report.cleanse, report.strip
    if cleanse.suspected is None:
        console.print(f"no class flagged (largest anomaly index {float(cleanse.anomaly_index.max()):.2f} ≤ "
                      f"{anomaly_threshold} or above the median norm)")
    else:
        console.print(f"[bold red]suspected backdoor target: class {cleanse.suspected} "
                      f"({cleanse.classes[cleanse.suspected]})[/]  →  {out / 'suspected-trigger.png'}")
    line = (f"STRIP: clean entropy median {strip['clean']['q50']:.3f} nats; inference threshold "
            f"{strip['threshold']:.3f} (rejects 1% of clean inputs)")
    if "auroc" in strip:
        line += (f"; triggered median {strip['triggered']['q50']:.3f}, AUROC {strip['auroc']:.3f}, "
                 f"caught at threshold {strip['detected_at_threshold']:.1%}")
    console.print(line)
    console.print(f"→ {path}, {out / 'triggers.png'}")


def _scan_table(report, title: str) -> Table:
    cleanse = report.cleanse
    table = Table(title=title)
    for column in ("class", "mask L1 (px)", "anomaly index", "trigger success", "flagged"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in cleanse.to_dict()["per_class"]:
        style = "[bold red]" if row["flagged"] else ""
        success = f"{row['success']:.1%}" + ("" if row["reached_threshold"] else " (never reached)")
        table.add_row(f"{style}{row['class']} {row['name']}", f"{style}{row['norm']:.2f}",
                      f"{style}{row['anomaly_index']:.2f}", success, "[bold red]yes" if row["flagged"] else "")
    return table


triggers_app = typer.Typer(help="The trigger library: list triggers, render them on images.", no_args_is_help=True)
app.add_typer(triggers_app, name="triggers")


@triggers_app.command("list")
def triggers_list_cmd() -> None:
    """Every trigger with its parameters and defaults, and the spec syntax."""
    from kdbackdoor.triggers import describe_syntax
    console.print(describe_syntax(), highlight=False, soft_wrap=True)


@triggers_app.command("show")
def triggers_show_cmd(
    specs: list[str] = typer.Argument(..., help="one or more trigger specs, e.g. badnets-square blend:alpha=0.1"),
    dataset: str = typer.Option("digits", help=DATASET_HELP),
    split: str = typer.Option("test"),
    data_dir: Optional[Path] = typer.Option(None),
    resize: Optional[int] = typer.Option(None),
    count: int = typer.Option(8, min=1, help="images per grid"),
    seed: int = typer.Option(0, help="trigger seed (random patterns) and image draw"),
    out: Path = typer.Option(Path("triggers"), help="folder for the PNG grids (one per trigger)"),
) -> None:
    """Write PNG grids: clean images, triggered images, and their difference (amplified)."""
    import torch
    from kdbackdoor.triggers import render_trigger_grid

    data = _load(dataset, split, data_dir, resize)
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    images = data.pixels(rows)
    for spec in specs:
        trig = _trigger(spec, data.image_shape, seed)
        safe = "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in spec)[:80]
        path = render_trigger_grid(trig, images, out / f"{safe}.png", max_images=count)
        console.print(f"{trig.describe()}  →  {path}")


@app.command("verify")
def verify_cmd(
    run: Path = typer.Argument(..., help="a run folder (with metrics.json or manifest.json) or its record file"),
) -> None:
    """Check a finished run's files against the sha256 checksums in its record.

    Prints OK, MISMATCH (the file changed since the run wrote it) or MISSING per file; exits
    with code 1 when any file is not OK, 2 when there is no usable record.
    """
    from kdbackdoor.run_record import verify_run
    record, checks = verify_run(run)
    table = Table(title=f"{record}")
    for column in ("file", "status", "sha256 (recorded)"):
        table.add_column(column)
    colours = {"OK": "green", "MISMATCH": "bold red", "MISSING": "bold red"}
    for check in checks:
        table.add_row(check.name, f"[{colours[check.status]}]{check.status}", check.expected[:16] + "…")
    console.print(table)
    bad = [check for check in checks if check.status != "OK"]
    if bad:
        err_console.print(f"[bold red]error:[/] {len(bad)} of {len(checks)} files do not match the record: "
                          + ", ".join(f"{c.name} ({c.status})" for c in bad), highlight=False)
        raise typer.Exit(1)
    console.print(f"all {len(checks)} files match the record")


@app.command("datasets")
def datasets_cmd() -> None:
    """List the data-set sources."""
    from kdbackdoor.data.sources import available_datasets
    for name in available_datasets():
        console.print(name)


@app.command("models")
def models_cmd() -> None:
    """List the architectures."""
    from kdbackdoor.models import available_architectures
    for name in available_architectures():
        console.print(name)


# ---- experiments: configs, sweeps, reports (kdbackdoor.experiment; docs/experiments.md) ----

RESULTS = typer.Option(Path("runs/results"), help="results folder: runs/<run_id>/ (one folder per run), cache/ "
                       "(teachers and poisoned sets shared by its runs), index.csv (every run)")
OVERRIDES = typer.Argument(None, help="KEY=VALUE changes on dotted config keys, e.g. distill.kd.kd_lambda=1 "
                           "poison.trigger=badnets-square:size=4 (values are YAML: 0.5, true, null, [1, 2])",
                           show_default=False)


@app.command("run")
def run_cmd(
    config: Path = typer.Argument(..., help="experiment config (YAML), e.g. configs/attack/base-cpu.yaml"),
    overrides: Optional[list[str]] = OVERRIDES,
    results: Path = RESULTS,
    dry_run: bool = typer.Option(False, help="validate, print the resolved config and the run folder, run nothing"),
    progress: bool = PROGRESS,
) -> None:
    """Run one experiment described by a config: teacher, optional poisoned distillation set,
    student, evaluation.

    Every option of train-teacher, poison-distill and distill has a config key (see
    docs/experiments.md). The config is validated before any work; teachers and poisoned
    sets are cached in RESULTS/cache by the hash of their settings, so a second run with
    the same teacher settings reuses it. A finished run is not run again; an interrupted
    one continues. The run's folder holds config.yaml, log.txt, metrics.json, student/
    and pictures; RESULTS/index.csv gets a row.
    """
    import yaml
    from kdbackdoor.experiment.config import load_config
    from kdbackdoor.experiment.index import record_row, update_index
    from kdbackdoor.experiment.runner import RUNS_DIR, preflight, run_dir, run_experiment

    experiment = load_config(config, overrides or [])
    folder = run_dir(results, experiment)
    if dry_run:
        preflight(experiment)
        console.print(yaml.safe_dump(experiment.to_data(), sort_keys=False), highlight=False)
        console.print(f"valid; the run would go to {folder}")
        return
    record = run_experiment(experiment, results, progress=progress)
    update_index(results, [record_row(record, f"{RUNS_DIR}/{record['run_id']}")])
    reused = [name for name, stage in record["stages"].items() if stage["cached"]]
    console.print(_run_summary({"metrics": record["metrics"], "teacher_metrics": record["teacher_metrics"],
                                "baseline": {"metrics": record["baseline_metrics"]}
                                if record.get("baseline_metrics") else None}))
    console.print(f"reused from the cache: {', '.join(reused) or 'nothing'}\n→ {folder}")


@app.command("sweep")
def sweep_cmd(
    sweep: Path = typer.Argument(..., help="sweep file (YAML): base config, grid, zip, seeds"),
    overrides: Optional[list[str]] = OVERRIDES,
    results: Path = RESULTS,
    jobs: int = typer.Option(1, min=1, help="runs at once (local: worker processes sharing the CPU cores; "
                             "ray: CPUs of a local Ray instance)"),
    backend: str = typer.Option("local", help="local | ray (pip install 'kdbackdoor\\[ray]')"),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (auto or HOST:PORT; default: start a "
                                          "local instance)"),
    cpus_per_run: float = typer.Option(1.0, help="Ray: CPUs reserved per run"),
    gpus_per_run: float = typer.Option(0.0, help="Ray: GPUs reserved per run (1: one GPU per run)"),
    dry_run: bool = typer.Option(False, help="validate and list the runs, run nothing"),
    progress: bool = PROGRESS,
) -> None:
    """Run a grid of experiments; skip complete runs, re-run failed or interrupted ones.

    Expands the grid (every combination), zipped lists (varied together) and seeds over
    the base config, validates every run first, then runs what is not complete into
    RESULTS/runs/ and keeps RESULTS/index.csv up to date. Calling it again after a crash
    or a kill continues the sweep; a finished sweep does no work. Exit code 1 when a run
    failed (the others still ran; see the index's error column and the run's log.txt).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from kdbackdoor.experiment.runner import is_complete, preflight, run_dir
    from kdbackdoor.experiment.sweep import load_sweep, run_sweep

    spec, runs = load_sweep(sweep, overrides or [])
    if dry_run:
        for run in runs:
            preflight(run.config)
            state = "complete" if is_complete(run_dir(results, run.config)) else "to run"
            label = ", ".join(f"{key}={value}" for key, value in run.label.items()) or "(base config)"
            console.print(f"{run.run_id}  {state:<8}  {label}", highlight=False)
        console.print(f"{len(runs)} runs, all valid")
        return
    columns = [TextColumn(f"[bold]sweep {spec.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("sweep", total=len(runs))

        def on_event(kind: str, run_id: str, detail: str) -> None:
            if kind == "start":
                bar.console.print(f"start {run_id}: {detail}", highlight=False)
            elif kind == "failed":
                bar.console.print(f"[bold red]failed[/] {run_id}: {detail}", highlight=False)
            if kind != "start":
                bar.advance(task)
        result = run_sweep(spec, runs, results, jobs=jobs, backend=backend, address=address,
                           cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, progress=False, on_event=on_event)
    console.print(f"{len(result.completed)} runs completed, {len(result.skipped)} already complete, "
                  f"{len(result.failed)} failed in {result.seconds:.1f} s; index: {results / 'index.csv'}")
    if result.failed:
        raise typer.Exit(1)


@app.command("report")
def report_cmd(
    runs: list[Path] = typer.Argument(..., help="results folders (with index.csv), index.csv files or run folders"),
    out: Path = typer.Option(Path("report.html"), help="report file (.html: one self-contained page; .md: "
                             "Markdown with its pictures in <name>_files/)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="html | md (default: from the --out suffix)"),
) -> None:
    """Tables (mean ± std over seeds, in the papers' layouts), plots and image grids of complete runs.

    Tables: every condition; ABD's layout (teacher trigger × method, with and without the
    defense) for backdoored teachers distilled without data; the attack's ASR/ACC vs λ,
    manipulation method, poison rate and trigger when they vary. Plots: ASR vs λ, ACC vs ASR.
    Pictures: triggers, poisons beside their clean sources, synthetic samples.
    """
    from kdbackdoor.experiment.report import write_report
    console.print(f"report → {write_report(runs, out, fmt)}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="output folder (replaced if it holds an earlier demo)"),
    dataset: str = typer.Option("digits", help="digits (embedded, a few minutes on a CPU), or cifar10 / any "
                                "32x32 RGB data set spec for the same demo at CPU scale on real data (hours on a "
                                "2-core CPU)"),
    data_dir: Optional[Path] = typer.Option(None, help="where the cifar10 archives are (else downloaded)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    config: Optional[Path] = typer.Option(None, help="a sweep file of the demo's shape to run instead of the "
                                          "packaged one (configs/demo/digits.yaml, cifar10.yaml)"),
    progress: bool = typer.Option(True),
) -> None:
    """End-to-end demo: the distillation-set attack against a clean teacher, data-free KD of a
    backdoored teacher with and without ABD, a filter audit; prints a table and writes an HTML report."""
    from kdbackdoor.demo import run_demo
    run_demo(out, dataset=dataset, data_dir=str(data_dir) if data_dir else None, device=device, config=config,
             progress=progress, console=console)


def _evaluation_table(result: dict, title: str) -> Table:
    backdoor = result.get("backdoor")
    table = Table(title=title)
    for column in ["class", "ACC"] + (["ASR (as source)"] if backdoor else []):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, acc in result["per_class"].items():
        cells = [name, f"{acc:.2%}"]
        if backdoor:
            per_source = backdoor["per_source_class_asr"]
            cells.append(f"{per_source[name]:.2%}" if name in per_source else "(target)")
        table.add_row(*cells)
    table.add_row("[bold]all", f"[bold]{result['acc']:.2%}", *([f"[bold]{backdoor['asr']:.2%}"] if backdoor else []))
    if backdoor:
        table.caption = (f"without the trigger, {backdoor['target_without_trigger']:.2%} of the non-target images "
                         f"are called the target ({backdoor['target']})")
    return table


def _teacher_dataset(path: Path, teacher_meta: dict) -> dict:
    if not teacher_meta.get("dataset"):
        raise KDBackdoorError(f"{path}: the checkpoint records no data set; pass --test-data")
    return teacher_meta["dataset"]


def _distill_data_free(teacher, student_arch, config, defense, test_data, data_dir, resize, trigger, target,
                       evaluate_teacher, out, device, resume, progress) -> None:
    """`distill` with a data-free method: no training data; tested on --test-data or the teacher's data set."""
    from kdbackdoor.distill.data_free import distill_data_free
    from kdbackdoor.runtime import select_device
    dev = select_device(device)
    model, sidecar = _load_teacher(teacher, dev)
    teacher_meta = sidecar.get("metadata") or {}
    test_record = dataset_record(test_data, data_dir, resize) if test_data else _teacher_dataset(teacher, teacher_meta)
    test = _load(test_record["spec"], "test", _optional_path(test_record.get("data_dir")),
                 test_record.get("resize"), progress)
    backdoor = _distill_backdoor(trigger, target, None, teacher_meta.get("backdoor"), test.image_shape, config.seed)
    metadata = {"dataset": test_record,
                "teacher": {"path": str(teacher), "weights_sha256": sidecar.get("weights_sha256")}}
    _, record = distill_data_free(model, test, student_arch, config, out, device=dev, backdoor=backdoor,
                                  defense=defense, evaluate_teacher=evaluate_teacher, resume=resume, progress=progress,
                                  metadata=metadata)
    console.print(_run_summary(record))
    console.print(f"→ {out / 'model.safetensors'}")


def _distill_defense(defense, method, views, num_views, noise_sigma, blur_sigma, jpeg_quality, seed):
    """Validate ``--defense`` against ``--method`` (the one place that does); the robust-kd
    settings, or None when no defense changes the distillation."""
    from kdbackdoor.experiment.config import DEFENSES
    if defense not in DEFENSES:
        raise KDBackdoorError(f"unknown --defense {defense!r}; use {' | '.join(DEFENSES)}")
    methods = DEFENSES[defense]
    if method in DEFENSES["none"] and method not in methods:
        raise KDBackdoorError(f"--defense {defense} works with --method {' | '.join(methods)}, not {method!r}")
    if defense != "robust-kd":
        return None
    from kdbackdoor.defenses.robust_kd import RobustKDConfig
    from kdbackdoor.defenses.views import ViewConfig, parse_kinds
    view_config = _validated(ViewConfig, kinds=parse_kinds(views), noise_sigma=_pixel_value(noise_sigma, "--noise-sigma"),
                             blur_sigma=blur_sigma, jpeg_quality=jpeg_quality)
    return _validated(RobustKDConfig, views=view_config, num_views=num_views, seed=seed)


def _vaccine_config(sv_coefficient, sv_copies, sv_layers, sv_tail_test, seed, **more):
    from kdbackdoor.defenses.shuffling_vaccine import ShufflingVaccineConfig
    return _validated(ShufflingVaccineConfig, {f: f"--sv-{f.replace('_', '-')}" for f in ShufflingVaccineConfig.model_fields},
                      coefficient=sv_coefficient, copies=sv_copies, layers=sv_layers, tail_test=sv_tail_test, seed=seed,
                      **more)


def _retrospection_config(sr_rounds, sr_portion, sr_start, sr_phase_lr, sr_perturb_model, seed):
    from kdbackdoor.defenses.self_retrospection import SelfRetrospectionConfig
    return _validated(SelfRetrospectionConfig,
                      {f: f"--sr-{f.replace('_', '-')}" for f in SelfRetrospectionConfig.model_fields},
                      rounds=sr_rounds, portion=sr_portion, start=sr_start,
                      phase_lr=sr_phase_lr or None, perturb_model=sr_perturb_model, seed=seed)


def _data_free_defense(defense, sv_coefficient, sv_copies, sv_layers, sv_tail_test, sr_rounds, sr_portion,
                       sr_start, sr_phase_lr, sr_perturb_model, seed):
    """The ABD defense object for ``--defense abd|sv|sr`` (None for none), settings validated."""
    from kdbackdoor.defenses.abd import build_data_free_defense
    return build_data_free_defense(defense, _vaccine_config(sv_coefficient, sv_copies, sv_layers, sv_tail_test, seed),
                                   _retrospection_config(sr_rounds, sr_portion, sr_start, sr_phase_lr,
                                                         sr_perturb_model, seed))


def _distill_backdoor(trigger, target, manifest, teacher_backdoor, image_shape, seed):
    """The backdoor a student is checked for: --trigger/--target, else the poisoned set's, else
    the teacher's recorded one, else none."""
    from kdbackdoor.distill.dataset_kd import Backdoor
    from kdbackdoor.triggers import build_trigger
    if trigger is not None:
        recorded = (manifest or {}).get("target", (teacher_backdoor or {}).get("target"))
        if target is None and recorded is None:
            raise KDBackdoorError("--trigger given without --target")
        return Backdoor(_trigger(trigger, image_shape, seed), target if target is not None else recorded)
    if manifest is not None and manifest.get("trigger"):
        return Backdoor(build_trigger(manifest["trigger"]), target if target is not None else manifest["target"],
                        manifest["config"].get("source_classes"))
    if teacher_backdoor and teacher_backdoor.get("trigger"):
        return Backdoor(build_trigger(teacher_backdoor["trigger"]),
                        target if target is not None else teacher_backdoor["target"])
    if target is not None:
        raise KDBackdoorError("--target given without --trigger (neither the data nor the teacher records one)")
    return None


def _start_run(out: Path, resume: bool, deterministic: bool) -> None:
    """Before a run's work starts: deterministic kernels if asked; on resume, drop the temporaries
    that the interrupted run's half-finished writes left in ``out``."""
    from kdbackdoor.atomic import remove_temporaries
    from kdbackdoor.runtime import set_deterministic
    if deterministic:
        set_deterministic(True)
    if resume:
        remove_temporaries(out)


def _load_teacher(path: Path, device):
    from kdbackdoor.models import load_checkpoint
    return load_checkpoint(path, device=device)


def _int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise KDBackdoorError(f"{option}: expected comma-separated integers, got {text!r}") from None


def _pixel_value(text: str, option: str) -> float:
    """A float or a fraction such as 8/255."""
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise KDBackdoorError(f"{option}: expected a number or a fraction like 8/255, got {text!r}") from None


def _engine_params(method, eps, step_size, steps, norm, extra: list[str]) -> dict:
    params = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KDBackdoorError(f"--param: expected KEY=VALUE, got {item!r}")
        params[key.strip().replace("-", "_")] = _pixel_value(value, f"--param {key}") if "/" in value else value
    named = {"eps": _pixel_value(eps, "--eps") if eps else None,
             "step_size": _pixel_value(step_size, "--step-size") if step_size else None,
             "steps": steps, "norm": norm}
    params.update({key: value for key, value in named.items() if value is not None})
    if method == "fgsm" and "steps" in params:
        raise KDBackdoorError("fgsm takes a single step; --steps does not apply")
    return params


def _optional_path(text: Optional[str]) -> Optional[Path]:
    return Path(text) if text else None


def _poisoned_set_summary(path: str, manifest: dict) -> dict:
    """What a student's record keeps of the poisoned set it was distilled on."""
    keys = ("data_sha256", "teacher", "trigger", "target", "engine", "config", "counts", "teacher_stability",
            "perturbation", "source_classes")
    return {"path": str(path), **{key: manifest.get(key) for key in keys}}


def _run_summary(record: dict, student: bool = True) -> str:
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
        lines.append(_defense_line(record))
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


def _defense_line(record: dict) -> str:
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


def _trigger(spec: str, image_shape: tuple[int, int, int], seed: int):
    from kdbackdoor.triggers import build_trigger
    return build_trigger(spec, image_shape=image_shape, seed=seed)


def _load_model(path: Path, device, data):
    from kdbackdoor.evaluate import check_compatible
    from kdbackdoor.models import load_checkpoint
    model, _ = load_checkpoint(path, device=device)
    check_compatible(model, data)
    return model


def _model_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _train_config(epochs, batch_size, lr, weight_decay, schedule, label_smoothing, crop_padding, hflip,
                  eval_every, seed, cutmix=0.0, compile_model=False):
    from kdbackdoor.training import TrainConfig
    return _validated(TrainConfig, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      schedule=schedule, label_smoothing=label_smoothing, crop_padding=crop_padding,
                      hflip=hflip, cutmix=cutmix, eval_every=eval_every, seed=seed, compile=compile_model)


def _validated(model_cls, options: Optional[dict[str, str]] = None, **values):
    """``model_cls(**values)``; a validation error names the CLI option: ``options`` maps a field to
    its option where they differ (rate -> --poison-rate), else --field-name."""
    from pydantic import ValidationError
    try:
        return model_cls(**values)
    except ValidationError as exc:
        def option(loc: tuple) -> str:
            return (options or {}).get(loc[0]) or f"--{'-'.join(map(str, loc)).replace('_', '-')}"
        problems = "; ".join(f"{option(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise KDBackdoorError(f"invalid option: {problems}") from None


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2. ``argv`` defaults to
    the command line (given, it runs the CLI in-process, as tests do)."""
    try:
        app(args=argv)
    except KDBackdoorError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except OSError as exc:  # unwritable output, disk full, missing file outside our checks
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun with --resume to continue where the last epoch ended")
        sys.exit(130)


if __name__ == "__main__":
    main()

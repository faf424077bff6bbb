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
from kdbackdoor.errors import KDBackdoorError

app = typer.Typer(
    help="Attack, defend and audit knowledge distillation against backdoors.\n\n"
    "Images are pixel-space [0,1] tensors; data sets are loaded once into memory as uint8.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # errors stay on one line

DATASET_HELP = ("data set: digits (embedded, no download), cifar10, cifar100 (downloaded with checksum "
                "or read from --data-dir), gtsrb (official layout in --data-dir), imagefolder:PATH, npz:PATH")
DEVICE_HELP = "auto (CUDA when present), cpu, cuda, cuda:N"
DATA_FREE = "Data-free (--method zskt | dfad)"

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
SEED = typer.Option(0)
DATA_DIR = typer.Option(None, help="where cifar/gtsrb files are (else the cache/download)")
RESIZE = typer.Option(None, help="resize images to this many px (square)")
DEVICE = typer.Option("auto", help=DEVICE_HELP)
RESUME = typer.Option(False, help="continue an interrupted run in --out")
PROGRESS = typer.Option(True, help="show progress bars")


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
    seed: int = SEED,
    data_dir: Optional[Path] = DATA_DIR,
    resize: Optional[int] = RESIZE,
    device: str = DEVICE,
    resume: bool = RESUME,
    progress: bool = PROGRESS,
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
                           eval_every, seed)
    poison = _validated(PoisonConfig, target=target, rate=poison_rate, mode=poison_mode, style=poison_style,
                        adv_eps=adv_eps, seed=seed)
    dev = select_device(device)
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
    assigns to the target once the trigger is applied.
    """
    from kdbackdoor.atomic import write_json
    from kdbackdoor.evaluate import accuracy, attack_success_rate
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
    result = {"model": str(model), "dataset": dataset, "split": split,
              **accuracy(net, data, device=dev, batch_size=batch_size)}
    backdoor = meta.get("backdoor") or {}
    trig = _trigger(trigger, data.image_shape, 0) if trigger else (
        build_trigger(backdoor["trigger"]) if backdoor.get("trigger") else None)
    target = target if target is not None else backdoor.get("target")
    if trig is not None:
        if target is None:
            raise KDBackdoorError("--trigger given without --target (the checkpoint records no target)")
        asr = attack_success_rate(net, data, trig, target, device=dev, batch_size=batch_size)
        result["backdoor"] = {"trigger": trig.config(), "target": target, "asr": asr["asr"],
                              "per_source_class_asr": asr["per_source_class"], "n": asr["n"]}
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
    device: str = DEVICE,
    progress: bool = PROGRESS,
) -> None:
    """Poison a distillation set against a clean teacher (arXiv 2504.21323).

    Source images are turned into images the teacher labels as the target (optimised with
    the trigger on), the trigger is overlaid, and only poisons the teacher verifiably labels
    as the target are kept. Writes the poisoned set (npz, provenance included) and a
    manifest with every parameter, the counts and the teacher's stability on the poisons.

    Engine parameters and defaults (pixel units, for 32 px images):

    \b
    ENGINES
    """
    from kdbackdoor.attacks.distill_poisoning import DistillPoisonConfig, LABEL_MODES, craft_poisoned_set
    from kdbackdoor.attacks.engines import build_engine
    from kdbackdoor.data.poisoned_set import MANIFEST_FILE, save_poisoned_set
    from kdbackdoor.models.generator import load_generator
    from kdbackdoor.runtime import select_device
    from kdbackdoor.triggers.show import render_change_grid

    if (out / MANIFEST_FILE).exists():
        raise KDBackdoorError(f"{out} already holds a poisoned set; choose another --out or delete it first")
    config = _validated(DistillPoisonConfig, target=target, rate=rate, mode=mode,
                        source_classes=_int_list(source_classes, "--source-classes"), label_mode=label_mode,
                        threshold=threshold, retries=retries, seed=seed, batch_size=batch_size)
    engine_params = _engine_params(method, eps, step_size, steps, norm, param)
    dev = select_device(device)
    model, sidecar = _load_teacher(teacher, dev)
    data = _load(dataset, split, data_dir, resize, progress)
    if subset is not None and subset < len(data):
        import torch
        rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:subset].sort()[0]
        data = data.subset(rows, name=f"{data.name}[subset {subset}]")
    trig = _trigger(trigger, data.image_shape, seed)
    gen_model = load_generator(generator, dev) if generator is not None else None
    engine = build_engine(method, generator_model=gen_model, **engine_params)
    poisoned, report = craft_poisoned_set(model, data, trig, engine, config, device=dev, progress=progress)
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
        **report,
    }
    path = save_poisoned_set(poisoned, out, manifest)
    rows = poisoned.provenance.poisoned.nonzero().squeeze(1)[:8]
    sources = poisoned.provenance.source_index[rows]
    render_change_grid(data.pixels(sources), poisoned.pixels(rows), out / "poisons.png")
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
                               "teacher's own data set; zskt, dfad: data-free, images from an adversarial "
                               "generator (--data unused)"),
    kd_lambda: Optional[float] = typer.Option(None, help="λ in (1-λ)·CE(student, label) + λ·T²·KL(teacher_T ‖ "
                                              "student_T); 0 = labels only, 1 = KL only (default 0.5; ood: 1)"),
    cutmix: float = typer.Option(0.0, help="CutMix probability per image (KL only, e.g. with ood)"),
    temperature: float = typer.Option(4.0, help="softmax temperature T"),
    test_data: Optional[str] = typer.Option(None, help="test data set (default: the test split of the "
                                            "distillation data's source; for ood the teacher's data set)"),
    baseline: Optional[bool] = typer.Option(None, help="also distill a student on the same data without its "
                                            "poisons, for comparison (doubles the time; default: on for "
                                            "poisoned sets)"),
    trigger: Optional[str] = typer.Option(None, help="trigger spec for ASR (default: the poisoned set's, else the "
                                          "teacher's recorded backdoor)"),
    target: Optional[int] = typer.Option(None, help="ASR target (default: the poisoned set's or the teacher's)"),
    evaluate_teacher: bool = typer.Option(True, help="also record the teacher's ACC/ASR on the test set"),
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    weight_decay: float = WEIGHT_DECAY,
    schedule: str = SCHEDULE,
    label_smoothing: float = LABEL_SMOOTHING,
    crop_padding: int = CROP_PADDING,
    hflip: bool = HFLIP,
    eval_every: int = EVAL_EVERY,
    seed: int = SEED,
    data_dir: Optional[Path] = DATA_DIR,
    resize: Optional[int] = RESIZE,
    device: str = DEVICE,
    resume: bool = RESUME,
    progress: bool = PROGRESS,
    iterations: int = typer.Option(2000, min=1, help="outer iterations", rich_help_panel=DATA_FREE),
    generator_steps: int = typer.Option(1, min=1, help="generator steps per iteration", rich_help_panel=DATA_FREE),
    student_steps: Optional[int] = typer.Option(None, min=1, help="student steps per iteration (zskt 10, dfad 5)",
                                                rich_help_panel=DATA_FREE),
    latent_dim: Optional[int] = typer.Option(None, min=1, help="generator latent size (zskt 100, dfad 256)",
                                             rich_help_panel=DATA_FREE),
    generator_lr: Optional[float] = typer.Option(None, help="generator Adam step (1e-3)", rich_help_panel=DATA_FREE),
    student_lr: Optional[float] = typer.Option(None, help="student step (zskt Adam 2e-3, dfad SGD 0.1)",
                                               rich_help_panel=DATA_FREE),
    attention_beta: Optional[float] = typer.Option(None, help="attention-transfer weight β (zskt 250)",
                                                   rich_help_panel=DATA_FREE),
    checkpoint_every: int = typer.Option(50, min=1, help="save the resumable state every N iterations",
                                         rich_help_panel=DATA_FREE),
) -> None:
    """Distill a teacher into a student on a data set (clean, poisoned or out-of-distribution)
    or without data (zskt, dfad).

    Loss: (1-λ)·CE(student, label) + λ·T²·KL(teacher_T ‖ student_T), batch mean. The student
    is evaluated for ACC, and for ASR with the trigger recorded in a poisoned set's manifest
    or in a backdoored teacher's checkpoint; with restricted source classes also for the
    trigger's false-positive rate on the others. Without augmentation (--crop-padding 0
    --no-hflip) the teacher's logits are computed once.
    """
    from kdbackdoor.data.poisoned_set import is_poisoned_set, load_poisoned_set
    from kdbackdoor.distill.dataset_kd import distill
    from kdbackdoor.distill.generator_kd import GeneratorKDConfig
    from kdbackdoor.distill.losses import KDConfig
    from kdbackdoor.runtime import select_device

    if method in ("zskt", "dfad"):
        generator_config = _validated(
            GeneratorKDConfig, method=method, iterations=iterations, batch_size=batch_size, latent_dim=latent_dim,
            generator_lr=generator_lr, student_lr=student_lr, generator_steps=generator_steps,
            student_steps=student_steps, attention_beta=attention_beta, temperature=temperature,
            eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed)
        _distill_data_free(teacher, student_arch, generator_config, test_data, data_dir, resize, trigger, target,
                           evaluate_teacher, out, device, resume, progress)
        return
    if method not in ("dataset", "ood"):
        raise KDBackdoorError(f"unknown --method {method!r}; use dataset, ood, zskt or dfad")
    if method == "ood" and kd_lambda not in (None, 1.0):
        raise KDBackdoorError("--method ood distils on images whose labels mean nothing to the teacher: "
                              "it needs --kd-lambda 1")
    config = _train_config(epochs, batch_size, lr, weight_decay, schedule, label_smoothing, crop_padding, hflip,
                           eval_every, seed, cutmix)
    kd = _validated(KDConfig, kd_lambda=kd_lambda if kd_lambda is not None else (1.0 if method == "ood" else 0.5),
                    temperature=temperature)
    dev = select_device(device)
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
    use_baseline = (manifest is not None) if baseline is None else baseline
    if use_baseline and manifest is None:
        raise KDBackdoorError("--baseline needs a poisoned set (from poison-distill) as --data")
    metadata = {"method": method, "dataset": test_record, "transfer_set": record_dataset,
                "teacher": {"path": str(teacher), "weights_sha256": sidecar.get("weights_sha256")},
                "poisoned_set": _poisoned_set_summary(data, manifest) if manifest else None}
    _, record = distill(model, train, test, student_arch, config, kd, out, device=dev, backdoor=backdoor,
                        baseline=use_baseline, evaluate_teacher=evaluate_teacher, resume=resume,
                        progress=progress, metadata=metadata)
    console.print(_run_summary(record))
    console.print(f"→ {out / 'model.safetensors'}")


poison_distill_cmd.__doc__ = poison_distill_cmd.__doc__.replace(
    "ENGINES", describe_engines().replace("\n", "\n    "))


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


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="output folder (replaced if it holds an earlier demo)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    progress: bool = typer.Option(True),
) -> None:
    """End-to-end run on the embedded digits data (no download, a few minutes on a 2-core CPU)."""
    from kdbackdoor.demo import run_demo
    from kdbackdoor.runtime import select_device
    run_demo(out, device=select_device(device), progress=progress, console=console)


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
    return table


def _teacher_dataset(path: Path, teacher_meta: dict) -> dict:
    if not teacher_meta.get("dataset"):
        raise KDBackdoorError(f"{path}: the checkpoint records no data set; pass --test-data")
    return teacher_meta["dataset"]


def _distill_data_free(teacher, student_arch, config, test_data, data_dir, resize, trigger, target,
                       evaluate_teacher, out, device, resume, progress) -> None:
    """`distill --method zskt|dfad`: no training data; tested on --test-data or the teacher's data set."""
    from kdbackdoor.distill.generator_kd import distill_generator
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
    _, record = distill_generator(model, test, student_arch, config, out, device=dev, backdoor=backdoor,
                                  evaluate_teacher=evaluate_teacher, resume=resume, progress=progress,
                                  metadata=metadata)
    console.print(_run_summary(record))
    console.print(f"→ {out / 'model.safetensors'}")


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
    if manifest is not None:
        return Backdoor(build_trigger(manifest["trigger"]), target if target is not None else manifest["target"],
                        manifest["config"].get("source_classes"))
    if teacher_backdoor and teacher_backdoor.get("trigger"):
        return Backdoor(build_trigger(teacher_backdoor["trigger"]),
                        target if target is not None else teacher_backdoor["target"])
    if target is not None:
        raise KDBackdoorError("--target given without --trigger (neither the data nor the teacher records one)")
    return None


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
        sensitivity = metrics.get("trigger_sensitivity")
        if sensitivity and sensitivity.get("false_positive_rate") is not None:
            text += f" (trigger false-positive rate on non-source classes {sensitivity['false_positive_rate']:.2%})"
        return text
    lines = [line("student", record["metrics"])] if student else []
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
                  eval_every, seed, cutmix=0.0):
    from kdbackdoor.training import TrainConfig
    return _validated(TrainConfig, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      schedule=schedule, label_smoothing=label_smoothing, crop_padding=crop_padding,
                      hflip=hflip, cutmix=cutmix, eval_every=eval_every, seed=seed)


def _validated(model_cls, **values):
    from pydantic import ValidationError
    try:
        return model_cls(**values)
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise KDBackdoorError(f"invalid option: {problems}") from None


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
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

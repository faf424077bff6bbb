"""Options that several commands share, defined once (same name, default and help everywhere)."""

from __future__ import annotations

from pathlib import Path

import typer

TRAINING_PANEL = "Training"
RUN_PANEL = "Run: seed, device, resuming"
DATA_PANEL = "Data"
FOREIGN_PANEL = "Teacher given as bare foreign weights"

DATASET_HELP = ("digits, cifar10, cifar100, gtsrb, imagefolder:PATH or npz:PATH (what each is: "
                "`kdbackdoor datasets`)")
DEVICE_HELP = "auto (the machine's accelerator, e.g. CUDA, when present), cpu, or that accelerator: cuda, cuda:N, ..."

# Options shared by every command that trains a model (one definition, the same defaults).
EPOCHS = typer.Option(30, min=1, rich_help_panel=TRAINING_PANEL)
BATCH_SIZE = typer.Option(128, min=1, rich_help_panel=TRAINING_PANEL)
LR = typer.Option(0.1, help="peak learning rate (SGD, Nesterov momentum 0.9)", rich_help_panel=TRAINING_PANEL)
WEIGHT_DECAY = typer.Option(5e-4, rich_help_panel=TRAINING_PANEL)
SCHEDULE = typer.Option("onecycle", help="onecycle (linear warm-up then decay) | cosine | step | constant", rich_help_panel=TRAINING_PANEL)
LABEL_SMOOTHING = typer.Option(0.0, rich_help_panel=TRAINING_PANEL)
CROP_PADDING = typer.Option(None, help="random-crop padding in px, 0 disables (default: by data set, 1 for the 8x8 "
                            "digits, an eighth of the side otherwise)", rich_help_panel=TRAINING_PANEL)
HFLIP = typer.Option(None, "--hflip/--no-hflip", help="random horizontal flips (default: by data set, off for digits "
                     "and traffic signs)", rich_help_panel=TRAINING_PANEL)
EVAL_EVERY = typer.Option(1, help="test accuracy every N epochs (0: at the end only)", rich_help_panel=TRAINING_PANEL)
COMPILE = typer.Option(False, "--compile", help="torch.compile the model for training: faster steps after "
                       "minutes of compilation; for long runs, above all on CUDA", rich_help_panel=TRAINING_PANEL)
SEED = typer.Option(0, rich_help_panel=RUN_PANEL)
DATA_DIR = typer.Option(None, help="where cifar/gtsrb files are (else the cache/download)", rich_help_panel=DATA_PANEL)
RESIZE = typer.Option(None, help="resize images to this many px (square)", rich_help_panel=DATA_PANEL)
DEVICE = typer.Option("auto", help=DEVICE_HELP, rich_help_panel=RUN_PANEL)
RESUME = typer.Option(False, help="continue an interrupted run in --out", rich_help_panel=RUN_PANEL)
PROGRESS = typer.Option(True, help="show progress bars", rich_help_panel=RUN_PANEL)
DETERMINISTIC = typer.Option(False, help="use only deterministic kernels (torch.use_deterministic_algorithms; "
                             "fixes the cuBLAS workspace): identical numbers on CUDA too, somewhat slower", rich_help_panel=RUN_PANEL)

# Options of the commands that run experiments (run, sweep).
RESULTS = typer.Option(Path("runs/results"), help="results folder: runs/<run_id>/ (one folder per run), cache/ "
                       "(teachers and poisoned sets shared by its runs), index.csv (every run)")
OVERRIDES = typer.Argument(None, help="KEY=VALUE changes on dotted config keys, e.g. distill.kd.kd_lambda=1 "
                           "poison.trigger=badnets-square:size=4 (values are YAML: 0.5, true, null, [1, 2])",
                           show_default=False)

# How every command computes (the ``runtime`` section of an experiment config): given before the
# command, e.g. ``kdbackdoor --precision fp32 train-teacher ...``; unset, configs keep their own.
PRECISION = typer.Option(None, "--precision", help="auto (bf16 where the device computes it natively: CUDA, "
                         "AVX-512 BF16 CPUs; else fp32) | fp32 | bf16 | fp16 (with a dynamic loss scale)")
CHANNELS_LAST = typer.Option(None, "--channels-last/--no-channels-last", help="convolution weights and batches "
                             "in NHWC order (default: on)")
COMPILE_MODELS = typer.Option(None, "--compile/--no-compile", help="torch.compile the models' forward passes "
                              "(default: off; minutes of compilation, for long runs)")

# How to read a model given as bare weights (a .safetensors/.pt/.pth state dict without a kdbackdoor
# sidecar, e.g. from torchvision, timm or a data-free KD code base); for a kdbackdoor checkpoint, a
# timm-layout folder or hf:OWNER/REPO they are expectations checked against what it declares.
MODEL_ARCH = typer.Option(None, "--arch", help="architecture of bare foreign weights, e.g. wrn-16-2, "
                          "resnet18-imagenet, mobilenet-v2 (see `kdbackdoor models`); their key names are "
                          "matched against the namings it accepts", rich_help_panel=FOREIGN_PANEL)
MODEL_NUM_CLASSES = typer.Option(None, "--num-classes", min=1, help="class count of bare foreign weights", rich_help_panel=FOREIGN_PANEL)
MODEL_INPUT_SIZE = typer.Option(None, "--input-size", help="input side the weights were trained at: N or HxW px "
                                "(default: the source's, e.g. 224 for torchvision, 32 for CIFAR code bases)", rich_help_panel=FOREIGN_PANEL)
MODEL_MEAN = typer.Option(None, "--mean", help="per-channel normalisation mean in pixel [0, 1] space, "
                          "comma-separated, e.g. 0.485,0.456,0.406 (default: the source's)", rich_help_panel=FOREIGN_PANEL)
MODEL_STD = typer.Option(None, "--std", help="per-channel normalisation std, comma-separated (with --mean)", rich_help_panel=FOREIGN_PANEL)

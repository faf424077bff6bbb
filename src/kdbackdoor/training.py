"""The training loop shared by teacher training and distillation.

Data stays in memory (uint8, on the training device); each step draws a batch, applies the
batched augmentation on the device and calls a loss function. After every epoch the full
training state (weights, optimizer, schedule, random generator, history) is written
atomically, so ``resume=True`` continues an interrupted run and ends with the same numbers
as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kdbackdoor.atomic import atomic_path
from kdbackdoor.data.augment import augment
from kdbackdoor.data.dataset import ImageDataset
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.evaluate import accuracy, attack_success_rate
from kdbackdoor import stop_points
from kdbackdoor.numerics import autocast, compiled, grad_scaler, layout, to_layout
from kdbackdoor.runtime import Seed, cpu_generator
from kdbackdoor.state_file import load_tensors_pickle

STATE_FILE = "train_state.pt"

# loss_fn(model, pixels [0,1] (B,C,H,W) after augmentation, labels (B,), dataset rows (B,))
#   -> (scalar loss, student logits (B, K))
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class StepHook(Protocol):
    """Something that adds to each training step's gradient (e.g. Self-Retrospection's unlearning)."""

    def extra_gradients(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                        step: int, total: int) -> list[torch.Tensor] | None:
        """Gradients to add to the loss's before optimiser step ``step`` (0-based) of ``total``, one per
        trainable parameter of ``model`` in ``parameters()`` order, for the batch of pixel ``x``
        (None: nothing to add). May set the optimiser's learning rate for this step."""

    def state_dict(self) -> dict:
        """Resumable state (tensors and plain data only)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` gave."""


def optimizer_step(optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0) -> None:
    """``optimizer.step()``, after clipping the total gradient norm of its parameters to
    ``max_grad_norm`` when that is > 0."""
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                       max_grad_norm)
    optimizer.step()


def add_gradients(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Add ``grads`` to the ``.grad`` of ``params`` (setting it where there is none yet)."""
    for p, g in zip(params, grads):
        p.grad = g if p.grad is None else p.grad + g


class TrainConfig(BaseModel):
    """Optimisation recipe. Learning rates are per batch of ``batch_size`` images."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(30, ge=1, description="passes over the training set")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "step", "constant"] = Field(
        "onecycle", description="onecycle: linear warm-up then linear decay to 0; step: /10 at 50% and 75%")
    warmup: float = Field(0.2, ge=0, lt=1, description="share of steps spent warming up (onecycle)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    crop_padding: int = Field(4, ge=0, description="random crop with this zero padding (px); 0 disables")
    hflip: bool = Field(True, description="random horizontal flips")
    cutmix: float = Field(0.0, ge=0, le=1, description="probability that an image gets a box pasted from "
                          "another one; labels are not mixed, so only for losses that ignore them (KD, λ = 1)")
    eval_every: int = Field(1, ge=0, description="evaluate test ACC every N epochs (0: only at the end)")
    compile: bool = Field(False, description="torch.compile the model for its training steps: faster steps after "
                          "minutes of compilation (and again for the smaller last batch); for long runs")
    seed: Seed = 0


def lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total``."""
    t = step / max(1, total)
    if schedule == "onecycle":
        if t < warmup:
            return (step + 1) / max(1.0, warmup * total)
        return max(0.0, (1 - t) / (1 - warmup))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":
        return 0.1 ** ((t >= 0.5) + (t >= 0.75))
    return 1.0


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum; no weight decay on BatchNorm parameters and biases.

    Fused: one kernel updates every parameter (on CPU about 2-20x faster per step than the
    per-tensor loop; a small share of a training step either way).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0, fused=True,
    )


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    """Plain supervised loss: cross-entropy between the model's logits and the labels."""
    def loss_fn(model, x, y, idx):
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing), logits
    return loss_fn


def fit(
    model: torch.nn.Module,
    train: ImageDataset,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    loss_fn: LossFn,
    test: ImageDataset | None = None,
    device: torch.device | None = None,
    resume: bool = False,
    progress: bool = True,
    description: str = "train",
    on_epoch_end: Callable[[int, dict], None] | None = None,
    step_hook: StepHook | None = None,
    trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target: int | None = None,
) -> list[dict]:
    """Train ``model`` in place for ``config.epochs``; return the per-epoch history.

    History rows: epoch, loss, train_acc (on augmented batches), test_acc (when evaluated;
    with a ``trigger`` (pixel batches [0,1] in and out) and ``target``, also test_asr), lr,
    seconds, images_per_s. ``out_dir/train_state.pt`` holds the resumable state (with
    ``step_hook``'s own). ``step_hook`` adds gradients to every step.
    """
    device = device or next(model.parameters()).device
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_FILE
    if state_path.exists() and not resume:
        raise KDBackdoorError(
            f"{out_dir} already holds a training state; pass --resume to continue it, or choose another --out"
        )
    to_layout(model.to(device))
    train = train.to(device)
    if test is not None:
        test = test.to(device)
    optimizer = make_optimizer(model, config)
    step_model = compiled(model, force=config.compile)  # shares model's parameters and mode
    scaler = grad_scaler(device)  # fp16 only: a dynamic loss scale; otherwise a pass-through
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(config.schedule, s, total_steps, config.warmup))
    generator = cpu_generator(config.seed)
    history: list[dict] = []
    start_epoch = 0
    if resume and state_path.exists():
        try:
            state = load_tensors_pickle(state_path, "training state", "delete it to start over")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            history, start_epoch = state["history"], state["epoch"]
            if step_hook is not None:
                step_hook.load_state_dict(state["step_hook"])
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise KDBackdoorError(f"{state_path}: cannot resume from this training state ({reason}); "
                                  "it belongs to another model or settings, or is damaged: delete it to "
                                  "start over") from None

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(description, total=total_steps, completed=start_epoch * steps_per_epoch, status="")
        for epoch in range(start_epoch, config.epochs):
            model.train()
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            seen = 0
            batches = train.batches(config.batch_size, shuffle=True, generator=generator)
            for step, (x, y, idx) in enumerate(batches):
                x = augment(x, crop_padding=config.crop_padding, hflip=config.hflip, cutmix_p=config.cutmix,
                            generator=generator)
                x = layout(x)
                # before the loss: the hook's passes may touch BatchNorm buffers the loss's backward reads
                extra = (step_hook.extra_gradients(model, optimizer, x, epoch * steps_per_epoch + step, total_steps)
                         if step_hook is not None else None)
                with autocast(device):
                    loss, logits = loss_fn(step_model, x, y, idx)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if extra is not None:
                    scaler.unscale_(optimizer)  # the hook's gradients are unscaled
                    add_gradients([p for p in model.parameters() if p.requires_grad], extra)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                bar.advance(task)
                stop_points.reached("train-step")
                if step % 25 == 0:  # reading the loss syncs the device: not every step
                    bar.update(task, status=f"epoch {epoch + 1}/{config.epochs} loss {float(loss.detach()):.3f}")
            if not torch.isfinite(loss_sum):
                raise KDBackdoorError(
                    f"{description}: the loss became NaN or Inf in epoch {epoch + 1} (diverged); lower --lr "
                    "or check the inputs (nothing of this epoch was saved)")
            seconds = time.perf_counter() - started
            row = {
                "epoch": epoch + 1, "loss": float(loss_sum) / seen, "train_acc": float(correct) / seen,
                "lr": optimizer.param_groups[0]["lr"], "seconds": seconds, "images_per_s": seen / seconds,
            }
            last = epoch + 1 == config.epochs
            if test is not None and (last or (config.eval_every and (epoch + 1) % config.eval_every == 0)):
                row["test_acc"] = accuracy(model, test, device=device)["acc"]
                if trigger is not None:  # watch a backdoor being learnt (or not) epoch by epoch
                    row["test_asr"] = attack_success_rate(model, test, trigger, target, device=device)["asr"]
            history.append(row)
            bar.update(task, status=_status(row))
            _save_state(state_path, epoch + 1, model, optimizer, scheduler, generator, history, step_hook)
            stop_points.reached("train-state-saved")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
    model.eval()
    return history


def _status(row: dict) -> str:
    text = f"epoch {row['epoch']} loss {row['loss']:.3f} train {row['train_acc']:.1%}"
    return (text + (f" test {row['test_acc']:.1%}" if "test_acc" in row else "")
            + (f" ASR {row['test_asr']:.1%}" if "test_asr" in row else ""))


def _save_state(path: Path, epoch: int, model, optimizer, scheduler, generator, history, step_hook) -> None:
    state = {
        "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "history": history,
    }
    if step_hook is not None:
        state["step_hook"] = step_hook.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)

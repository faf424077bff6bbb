"""The attack on dataset-based distillation with a clean teacher (arXiv 2504.21323).

1. Draw source images (non-target classes, or the chosen ``source_classes``) with a seeded
   generator.
2. Turn them into images the clean teacher assigns to the target with a manipulation engine
   (``kdbackdoor.attacks.engines``), optimising with the trigger applied.
3. Overlay the trigger, quantise to uint8 (what will be stored) and **verify**: keep a
   sample only if the teacher gives the target a probability >= ``threshold`` on exactly
   that stored image. Failures are crafted again (a fresh random start) up to ``retries``
   times, then dropped and replaced by the next source image while any are left.
4. Inject the kept poisons (``add`` or ``replace``; see ``kdbackdoor.attacks.injection``)
   with provenance, labelled by ``label_mode``.

The report counts source images tried, crafting attempts, kept and dropped poisons, and
measures the teacher's stability on the kept poisons: target probability with the trigger,
without it, and on the clean source image.

Crafting can be resumed: with a ``state_path`` the poisons kept so far, the counters and the
random generator are saved atomically after every batch, under a fingerprint of everything
that decides the result (settings, engine, trigger, teacher weights, data). A resumed run
ends with exactly the set an uninterrupted one gives (on CPU).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kdbackdoor import stop_points
from kdbackdoor.atomic import atomic_path
from kdbackdoor.attacks.engines import EARLY_EXIT_ENGINES, Engine
from kdbackdoor.attacks.injection import InjectionMode, inject_poisons, poison_count
from kdbackdoor.data.dataset import ImageDataset, to_uint8
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.compatibility import check_compatible
from kdbackdoor.numerics import autocast, layout
from kdbackdoor.runtime import Seed
from kdbackdoor.state_file import load_tensors_pickle
from kdbackdoor.triggers import Trigger

CRAFT_STATE_FILE = "craft_state.pt"
"""Name of the resumable crafting state in an output folder (removed once the set is stored)."""

LABEL_MODES = {
    "target": "the attacker's target class",
    "teacher": "the teacher's prediction on the stored (triggered) poison",
    "original": "the source image's own label",
}


class DistillPoisonConfig(BaseModel):
    """Where poisons come from, how many, how they are checked and labelled."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    target: int = Field(0, ge=0, description="class the trigger should lead to")
    rate: float = Field(0.05, gt=0, lt=1, description="share of the final distillation set that is poison")
    mode: InjectionMode = Field("add", description="add: append poisons; replace: poisons take their source's place")
    source_classes: list[int] | None = Field(None, description="classes to draw sources from (default: all but the target)")
    label_mode: Literal["target", "teacher", "original"] = "target"
    threshold: float = Field(0.5, gt=0, le=1, description="teacher target probability a stored poison needs")
    retries: int = Field(2, ge=0, description="extra crafting attempts for a poison that fails verification")
    seed: Seed = 0
    batch_size: int = Field(128, ge=1, description="images crafted at once")
    early_exit: bool = Field(False, description="stop optimising a poison as soon as the teacher gives the target "
                             "at least `threshold` on it with the trigger (engines that support it: pgd); faster, "
                             "but the poisons carry the target less strongly than after every step")


def craft_poisoned_set(
    teacher: torch.nn.Module,
    data: ImageDataset,
    trigger: Trigger,
    engine: Engine,
    config: DistillPoisonConfig,
    *,
    device: torch.device | None = None,
    progress: bool = True,
    state_path: str | Path | None = None,
    resume: bool = False,
) -> tuple[ImageDataset, dict]:
    """Poison the distillation set ``data``; return the poisoned set and the attack report.

    The teacher is put in eval mode. The report holds the counts (requested, tried,
    attempts, kept, dropped, final size, achieved rate) and the teacher-stability and
    perturbation statistics of the kept poisons (probabilities in [0,1], distances in pixel
    units). Raises ``KDBackdoorError`` for inconsistent inputs or when no poison verifies.

    ``state_path``: where the resumable crafting state is saved after every batch (the caller
    deletes it once the result is safely stored). With ``resume`` an existing state is
    continued; it must come from the same inputs. Without ``resume`` an existing state is an error.
    """
    device = device or next(teacher.parameters()).device
    sources = _check_inputs(teacher, data, trigger, engine, config)
    count = poison_count(len(data), config.rate, config.mode)
    pool = torch.isin(data.labels.cpu(), torch.tensor(sources)).nonzero().squeeze(1)
    if count < 1:
        raise KDBackdoorError(f"poison rate {config.rate} gives no poison on {len(data)} images")
    if count > len(pool):
        raise KDBackdoorError(
            f"poison rate {config.rate} ({config.mode}) needs {count} source images but the chosen source "
            f"classes have {len(pool)} in {data.name or 'the data set'}")
    generator = torch.Generator().manual_seed(config.seed)
    queue = pool[torch.randperm(len(pool), generator=generator)]
    teacher.eval()

    state = _CraftState.empty(data.images.shape[1:])
    fingerprint = ""
    made_folder = False  # whether this call creates the state's folder (removed again if nothing is kept)
    if state_path is not None:
        state_path = Path(state_path)
        made_folder = not state_path.parent.exists()
        fingerprint = _fingerprint(teacher, data, trigger, engine, config)
        if state_path.exists() and not resume:
            raise KDBackdoorError(f"{state_path.parent} holds an interrupted crafting run; pass --resume to "
                                  "continue it, or choose another --out")
        if resume and state_path.exists():
            state = _CraftState.load(state_path, fingerprint, generator)
    columns = [TextColumn("[bold]craft poisons"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("craft", total=count, completed=len(state.rows), status="")
        while len(state.rows) < count and state.tried < len(queue):
            rows = queue[state.tried:state.tried + min(config.batch_size, count - len(state.rows))]
            state.tried += len(rows)
            rows, images, crafted, verified, used = _craft_verified(teacher, data, rows, trigger, engine, config,
                                                                    generator, device)
            state.attempts += used
            state.rows = torch.cat([state.rows, rows])
            state.images = torch.cat([state.images, images])
            state.crafted = torch.cat([state.crafted, crafted])
            state.verified = torch.cat([state.verified, verified])
            stop_points.reached("craft-batch")
            if state_path is not None:
                state.save(state_path, fingerprint, generator)
            bar.update(task, completed=len(state.rows),
                       status=f"tried {state.tried}, attempts {state.attempts}")
    rows, tried, attempts = state.rows, state.tried, state.attempts
    if len(rows) == 0:  # nothing to resume either: leave no state behind
        if state_path is not None:
            state_path.unlink(missing_ok=True)
            if made_folder and not any(state_path.parent.iterdir()):
                state_path.parent.rmdir()
        raise KDBackdoorError(
            f"no poison passed verification (threshold {config.threshold}) after trying {tried} source images; "
            "use a stronger engine setting (more steps, larger eps) or a lower --threshold")
    order = rows.argsort()
    rows, images, crafted, verified = rows[order], state.images[order], state.crafted[order], state.verified[order]
    stored = images.float() / 255
    labels = _labels(teacher, data, rows, stored, config, device)
    report = {
        "counts": {
            "clean_size": len(data), "requested": count, "tried": tried, "attempts": attempts,
            "kept": len(rows), "dropped": tried - len(rows),
            "final_size": len(data) + (len(rows) if config.mode == "add" else 0),
        },
        "source_classes": sources,
        "teacher_stability": _stability(teacher, data, rows, crafted, verified, trigger, config.target, device),
        "perturbation": _perturbation(data, rows, crafted, device),
    }
    counts = report["counts"]
    counts["achieved_rate"] = counts["kept"] / counts["final_size"]
    meta = {"distill_poison": {"config": config.model_dump(), "engine": engine.config(),
                               "trigger": trigger.config(), **report}}
    poisoned = inject_poisons(data, rows, images, labels, config.mode, meta=meta)
    return poisoned, report


class _CraftState:
    """Poisons kept so far (source rows, stored uint8 images with and without the trigger, the
    teacher's target probability on the stored image at verification) and counters."""

    def __init__(self, rows: torch.Tensor, images: torch.Tensor, crafted: torch.Tensor, verified: torch.Tensor,
                 tried: int, attempts: int) -> None:
        self.rows, self.images, self.crafted, self.verified = rows, images, crafted, verified
        self.tried, self.attempts = tried, attempts

    @staticmethod
    def empty(image_shape: tuple[int, ...]) -> "_CraftState":
        nothing = torch.zeros((0, *image_shape), dtype=torch.uint8)
        return _CraftState(torch.zeros(0, dtype=torch.int64), nothing, nothing.clone(), torch.zeros(0), 0, 0)

    def save(self, path: Path, fingerprint: str, generator: torch.Generator) -> None:
        state = {"fingerprint": fingerprint, "rows": self.rows, "images": self.images, "crafted": self.crafted,
                 "verified": self.verified, "tried": self.tried, "attempts": self.attempts,
                 "generator": generator.get_state()}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    @staticmethod
    def load(path: Path, fingerprint: str, generator: torch.Generator) -> "_CraftState":
        """The saved state; ``generator`` continues where the saved run's was."""
        try:
            state = load_tensors_pickle(path, "crafting state", "delete it to start over")
            if state["fingerprint"] != fingerprint:
                raise KDBackdoorError(
                    f"{path}: this interrupted crafting run used other inputs (settings, engine, trigger, "
                    "teacher or data); rerun with the same options, or choose another --out")
            generator.set_state(state["generator"])
            return _CraftState(state["rows"], state["images"], state["crafted"], state["verified"],
                               int(state["tried"]), int(state["attempts"]))
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError) as exc:
            raise KDBackdoorError(f"{path}: unreadable crafting state ({exc}); delete it to start over") from None


def _fingerprint(teacher: torch.nn.Module, data: ImageDataset, trigger: Trigger, engine: Engine,
                 config: DistillPoisonConfig) -> str:
    """sha256 of everything that decides the crafted set, so a resumed run cannot mix inputs."""
    digest = hashlib.sha256(json.dumps(
        {"config": config.model_dump(), "engine": engine.config(), "trigger": trigger.config()},
        sort_keys=True, default=str).encode())
    for tensor in (data.images, data.labels, *teacher.state_dict().values()):
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_engine(engine: Engine, config: DistillPoisonConfig) -> None:
    """Raise ``KDBackdoorError`` if ``config`` asks of ``engine`` what it cannot do (early exit)."""
    if config.early_exit and not engine.stops_early:
        raise KDBackdoorError(f"early exit is not supported by the {engine.name} engine (only by: "
                              f"{EARLY_EXIT_ENGINES})")


def _check_inputs(teacher, data, trigger, engine, config) -> list[int]:
    check_compatible(teacher, data)
    check_engine(engine, config)
    k = data.num_classes
    if config.target >= k:
        raise KDBackdoorError(f"target {config.target} out of range for {k} classes")
    if tuple(trigger.image_shape) != tuple(data.image_shape):
        raise KDBackdoorError(f"trigger built for images {tuple(trigger.image_shape)}, the data set has "
                              f"{tuple(data.image_shape)}")
    sources = sorted(set(config.source_classes)) if config.source_classes else [c for c in range(k) if c != config.target]
    bad = [c for c in sources if not 0 <= c < k or c == config.target]
    if bad:
        raise KDBackdoorError(f"source classes must be in [0, {k - 1}] and differ from the target "
                              f"{config.target}; got {bad}")
    return sources


@torch.no_grad()
def _target_probability(teacher, x: torch.Tensor, target: int) -> torch.Tensor:
    return teacher(x).float().softmax(1)[:, target]


def _craft_verified(teacher, data, rows, trigger, engine, config, generator, device):
    """Craft poisons for ``rows``, retrying failures.

    Returns (kept rows, stored uint8 poisons with trigger, the same before the trigger, the
    teacher's target probability on each kept stored poison, attempts).
    """
    x = data.pixels(rows.to(data.images.device)).to(device)
    targets = torch.full((len(rows),), config.target, device=device)
    images = torch.zeros(x.shape, dtype=torch.uint8)
    untriggered = torch.zeros(x.shape, dtype=torch.uint8)
    passed = torch.zeros(len(rows), dtype=torch.bool)
    verified = torch.zeros(len(rows))
    attempts = 0
    for _ in range(1 + config.retries):
        todo = (~passed).nonzero().squeeze(1)
        if len(todo) == 0:
            break
        attempts += len(todo)
        with autocast(device):  # the teacher's passes only: the perturbation and its steps stay fp32
            crafted = to_uint8(engine.craft(teacher, layout(x[todo]), targets[todo], trigger, generator,
                                            config.threshold if config.early_exit else None).detach())
        # verified in fp32, the teacher's own precision: a kept poison passes on the teacher as shipped
        stored = to_uint8(trigger(crafted.float() / 255))
        probability = _target_probability(teacher, stored.float() / 255, config.target).cpu()
        ok = probability >= config.threshold
        images[todo[ok]] = stored[ok].cpu()
        verified[todo[ok]] = probability[ok]
        untriggered[todo[ok]] = crafted[ok].cpu()
        passed[todo[ok]] = True
    return rows[passed], images[passed], untriggered[passed], verified[passed], attempts


def _labels(teacher, data, rows, stored, config, device) -> torch.Tensor:
    if config.label_mode == "target":
        return torch.full((len(rows),), config.target, dtype=torch.int64)
    if config.label_mode == "original":
        return data.labels.cpu()[rows]
    with torch.no_grad():
        return torch.cat([teacher(chunk.to(device)).argmax(1).cpu() for chunk in stored.split(512)])


def _summary(values: torch.Tensor) -> dict:
    values = values.float().cpu()
    return {"mean": float(values.mean()), "median": float(values.median()), "min": float(values.min()),
            "max": float(values.max())}


@torch.no_grad()
def _stability(teacher, data, rows, crafted, verified, trigger, target, device) -> dict:
    """Teacher target probability on the kept poisons with / without trigger and on the clean sources.

    With the trigger is the probability verification measured on the very stored image
    (``verified``), so it costs no second forward pass."""
    without, clean_p, clean_trig = [], [], []
    for chunk_rows, adv in zip(rows.split(512), crafted.split(512)):
        clean = data.pixels(chunk_rows.to(data.images.device)).to(device)
        without.append(_target_probability(teacher, adv.to(device).float() / 255, target))
        clean_p.append(_target_probability(teacher, clean, target))
        clean_trig.append(_target_probability(teacher, trigger(clean), target))
    return {name: _summary(torch.cat(values)) for name, values in (
        ("poison_with_trigger", [verified]), ("poison_without_trigger", without),
        ("clean_source", clean_p), ("clean_source_with_trigger", clean_trig))}


@torch.no_grad()
def _perturbation(data, rows, crafted, device) -> dict:
    """L∞ and L2 distance (pixel units) between the crafted images (before the trigger) and their sources."""
    linf, l2 = [], []
    for chunk_rows, adv in zip(rows.split(512), crafted.split(512)):
        clean = data.pixels(chunk_rows.to(data.images.device)).to(device)
        delta = adv.to(device).float() / 255 - clean
        linf.append(delta.flatten(1).abs().amax(1))
        l2.append(delta.flatten(1).norm(dim=1))
    return {"linf": _summary(torch.cat(linf)), "l2": _summary(torch.cat(l2))}

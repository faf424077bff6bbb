"""Shuffling Vaccine (ABD, Hong et al., ICML 2023): keep synthesis away from the backdoor.

A *suspect* model is the teacher with the input channels of its last convolutions randomly
permuted: its clean features are scrambled, while a backdoor's shortcut tends to survive. A
few such copies are averaged (logits) for a stable prediction. On a synthetic batch, the
samples the suspect puts in the teacher's class are backdoor-like, and the synthesis loss
pushes them away: −coefficient · mean over those samples of KL(teacher ‖ suspect)
(per-class mean, as ABD).

Before using it, a tail test checks that the suspect separates anything: over the first
``test_batches`` synthetic batches, the share of samples whose log10 KL(teacher ‖ suspect)
lies below mean − 3·std must exceed ``tail_threshold``; otherwise the copies are re-shuffled
(up to ``reshuffles`` times) and, if no shuffle passes, the vaccine is disabled and the run
record says so. Decisions use synthetic images only.

For OOD distillation (real transfer images of another data set) ``suspect_transfer_images``
runs the same test on the transfer set and marks the images the suspect agrees on; the
distillation then pushes the student away from the teacher on them, as ABD's OOD code does
(loss = mean KD on the others − coefficient · mean KD on them), or drops them. The defense
does this in its ``prepare_transfer_set`` hook, and then has no synthesis to act on.
"""

from __future__ import annotations

import copy
import time
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdbackdoor.data.dataset import ImageDataset, to_uint8
from kdbackdoor.distill.hooks import DistillDefense, TransferSet
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.models.classifier import conv_layers
from kdbackdoor.numerics import autocast
from kdbackdoor.runtime import Seed, Stopwatch, cpu_generator

IGNORED_BATCHES = 10  # the first synthetic batches (an untrained synthesiser's) say little
TAIL_TEST_IMAGES = 10000  # transfer images the OOD tail test looks at


class ShufflingVaccineConfig(BaseModel):
    """Settings of the Shuffling Vaccine (ABD's defaults)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    coefficient: float = Field(0.1, gt=0, description="weight of the vaccine's synthesis term")
    copies: int = Field(3, ge=1, description="shuffled copies averaged into the suspect")
    layers: int | None = Field(None, ge=1, description="last convolutions to shuffle (default: those of the "
                               "teacher's last stage)")
    tail_test: bool = Field(True, description="decide with the tail-ratio test whether to use the vaccine")
    test_batches: int = Field(50, ge=IGNORED_BATCHES + 1, description="synthetic batches seen before deciding "
                              f"(the first {IGNORED_BATCHES} are ignored)")
    tail_threshold: float = Field(0.02, ge=0, lt=1)
    reshuffles: int = Field(8, ge=1, description="shuffles tried before giving up")
    transfer_action: Literal["push", "drop"] = Field(
        "push", description="OOD KD: on the suspicious transfer images the student is pushed away from the "
        "teacher with weight coefficient (ABD's), or they are dropped")
    seed: Seed = 0


def shuffled_copy(model: nn.Module, layer_names: list[str], generator: torch.Generator) -> nn.Module:
    """A copy of ``model`` with the input channels of the named convolutions randomly permuted."""
    suspect = copy.deepcopy(model)
    _shuffle(suspect, layer_names, generator)
    return suspect


def _shuffle(model: nn.Module, layer_names: list[str], generator: torch.Generator) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in layer_names:
            weight = modules[name].weight
            order = torch.randperm(weight.shape[1], generator=generator).to(weight.device)
            weight.copy_(weight[:, order])


def tail_ratio(divergences: torch.Tensor) -> float:
    """Share of samples whose log10 divergence lies below mean − 3·std of all of them."""
    logs = divergences.double().clamp_min(1e-30).log10()
    return float((logs < logs.mean() - 3 * logs.std(unbiased=False)).double().mean())


class SuspectEnsemble(nn.Module):
    """The mean logits of ``copies`` shuffled copies of a teacher."""

    def __init__(self, teacher: nn.Module, copies: int, layers: int | None, generator: torch.Generator) -> None:
        super().__init__()
        self.layer_names = _layers_to_shuffle(teacher, layers)
        self.generator = generator
        self.copies = nn.ModuleList(shuffled_copy(teacher, self.layer_names, generator) for _ in range(copies))

    def reshuffle(self, teacher: nn.Module) -> None:
        """Draw new permutations (from the teacher's weights, not on top of the old ones)."""
        for suspect in self.copies:
            suspect.load_state_dict(teacher.state_dict())
            _shuffle(suspect, self.layer_names, self.generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([suspect(x) for suspect in self.copies]).mean(0)


def _layers_to_shuffle(teacher: nn.Module, layers: int | None) -> list[str]:
    convs = [name for name, _ in conv_layers(teacher)]
    if layers is None:
        last_stage = teacher.stage_names[-1] + "."
        chosen = [name for name in convs if name.startswith(last_stage)]
    else:
        if layers > len(convs):
            raise KDBackdoorError(f"the teacher has {len(convs)} convolutions; cannot shuffle the last {layers}")
        chosen = convs[-layers:]
    if not chosen:
        raise KDBackdoorError("the teacher's last stage has no convolution to shuffle; set the number of layers")
    return chosen


def divergence(suspect_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ suspect) per sample, averaged over classes as ABD does (N,)."""
    return F.kl_div(F.log_softmax(suspect_logits.float(), 1), F.log_softmax(teacher_logits.float(), 1),
                    reduction="none", log_target=True).mean(1)


@torch.no_grad()
def passes_tail_test(suspect: SuspectEnsemble, teacher: nn.Module, images: torch.Tensor,
                     config: ShufflingVaccineConfig, trials: list[float]) -> bool:
    """Re-shuffle ``suspect`` until its tail ratio on ``images`` exceeds the threshold (True) or the
    tries run out (False); each try's ratio is appended to ``trials``."""
    teacher_logits = teacher(images)
    for trial in range(config.reshuffles):
        if trial:
            suspect.reshuffle(teacher)
        trials.append(tail_ratio(divergence(suspect(images), teacher_logits)))
        if trials[-1] > config.tail_threshold:
            return True
    return False


@torch.no_grad()
def suspect_transfer_images(teacher: nn.Module, data: ImageDataset, config: ShufflingVaccineConfig | None = None,
                            *, device: torch.device, batch_size: int = 512) -> tuple[torch.Tensor | None, dict]:
    """The Shuffling Vaccine for OOD distillation: the transfer images on which the suspect agrees
    with the teacher (backdoor-like), if the tail test on the transfer set passes.

    Returns (a bool mask (N,) over ``data``'s rows, None when the vaccine stays off; a record of
    what was done). What to do with them is ``config.transfer_action``'s. Labels and provenance
    are not read.
    """
    config = config or ShufflingVaccineConfig()
    started = time.perf_counter()
    teacher = teacher.to(device).eval()
    suspect = SuspectEnsemble(teacher, config.copies, config.layers, cpu_generator(config.seed)).to(device).eval()
    trials: list[float] = []
    if config.tail_test:
        sample = torch.randperm(len(data), generator=cpu_generator(config.seed))[:TAIL_TEST_IMAGES]
        enabled = passes_tail_test(suspect, teacher, data.pixels(sample).to(device), config, trials)
    else:
        enabled = True
    record = {"name": "sv", "config": config.model_dump(), "enabled": enabled, "tail_ratios": trials,
              "shuffled_layers": suspect.layer_names, "transfer_images": len(data), "suspicious": 0}
    agree = None
    if enabled:
        with torch.no_grad(), autocast(device):
            agree = torch.cat([suspect(x).argmax(1) == teacher(x).argmax(1)
                               for x, _, _ in data.batches(batch_size, device=device)]).cpu()
        record["suspicious"] = int(agree.sum())
    record["seconds_this_run"] = time.perf_counter() - started  # .cpu() above waited for the device
    return agree, record


class ShufflingVaccine(DistillDefense):
    """The synthesis-side half of ABD: a synthesis-loss hook (data-free KD), or the transfer set's
    filter (OOD KD)."""

    name = "sv"

    def __init__(self, config: ShufflingVaccineConfig | None = None) -> None:
        self.config = config or ShufflingVaccineConfig()
        self.transfer_record: dict | None = None  # what it did to an OOD transfer set, if it saw one
        self.batches = 0
        self.enabled: bool | None = None if self.config.tail_test else True  # None: still testing
        self.trials: list[float] = []
        self.penalised = 0
        self.seen = 0
        self._test_images: list[torch.Tensor] = []
        self.stopwatch = Stopwatch()

    def prepare_transfer_set(self, teacher: nn.Module, transfer: TransferSet, device: torch.device) -> TransferSet:
        suspicious, record = suspect_transfer_images(teacher, transfer.data, self.config, device=device)
        self.transfer_record = record
        if suspicious is None:
            return transfer
        if self.config.transfer_action == "drop":
            record["dropped"] = record["suspicious"]
            keep = ~suspicious
            return TransferSet(transfer.data.subset(keep, name=f"{transfer.data.name}-vaccinated"),
                               None if transfer.push_away is None else transfer.push_away[keep], transfer.push_weight)
        record["pushed"] = record["suspicious"]
        return TransferSet(transfer.data, suspicious, self.config.coefficient)

    def setup(self, teacher, student, device) -> None:
        if self.transfer_record is not None:  # OOD KD: the transfer set is vaccinated; nothing to synthesise
            return
        self.teacher = teacher
        self.suspect = SuspectEnsemble(teacher, self.config.copies, self.config.layers,
                                       cpu_generator(self.config.seed)).to(device).eval().requires_grad_(False)

    def synthesis_loss(self, images: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        with self.stopwatch.timing(images.device):
            return self._synthesis_loss(images, teacher_logits)

    def _synthesis_loss(self, images: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        self.batches += 1
        if self.enabled is None:
            if self.batches > IGNORED_BATCHES:
                self._test_images.append(images.detach())
            if self.batches >= self.config.test_batches:
                self._decide()
            return None
        if not self.enabled:
            return None
        suspect_logits = self.suspect(images)
        agree = (suspect_logits.argmax(1) == teacher_logits.argmax(1)).float()
        self.penalised += int(agree.sum())
        self.seen += len(images)
        if agree.sum() == 0:
            return None
        return -self.config.coefficient * (divergence(suspect_logits, teacher_logits) * agree).sum() / agree.sum()

    @torch.no_grad()
    def _decide(self) -> None:
        self.enabled = passes_tail_test(self.suspect, self.teacher, torch.cat(self._test_images), self.config,
                                        self.trials)
        self._test_images = []

    def record(self) -> dict:
        if self.transfer_record is not None:
            return self.transfer_record
        return {"name": self.name, "config": self.config.model_dump(), "enabled": self.enabled,
                "tail_ratios": self.trials, "shuffled_layers": self.suspect.layer_names,
                "penalised_share": self.penalised / self.seen if self.seen else None,
                "seconds_this_run": self.stopwatch.seconds}

    def state_dict(self) -> dict:
        if self.transfer_record is not None:
            return {}
        return {"batches": self.batches, "enabled": self.enabled, "trials": self.trials, "penalised": self.penalised,
                "seen": self.seen, "suspect": self.suspect.state_dict(),
                "test_images": [to_uint8(x).cpu() for x in self._test_images]}

    def load_state_dict(self, state: dict) -> None:
        if self.transfer_record is not None:
            return
        self.batches, self.enabled, self.trials = state["batches"], state["enabled"], state["trials"]
        self.penalised, self.seen = state["penalised"], state["seen"]
        self.suspect.load_state_dict(state["suspect"])
        device = next(self.suspect.parameters()).device
        self._test_images = [x.to(device).float() / 255 for x in state["test_images"]]

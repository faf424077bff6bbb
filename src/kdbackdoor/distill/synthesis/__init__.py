"""Data-free image synthesisers, one per method, behind the ``Synthesizer`` interface."""

from kdbackdoor.distill.synthesis.adversarial import AdversarialGenerator
from kdbackdoor.distill.synthesis.base import PooledSynthesizer, SynthesisContext, Synthesizer
from kdbackdoor.distill.synthesis.contrastive import ContrastiveInversion
from kdbackdoor.distill.synthesis.inversion import DeepInversion

SYNTHESIZERS: dict[str, type[Synthesizer]] = {
    "zskt": AdversarialGenerator,
    "dfad": AdversarialGenerator,
    "deepinversion": DeepInversion,
    "cmi": ContrastiveInversion,
}

__all__ = ["SYNTHESIZERS", "AdversarialGenerator", "ContrastiveInversion", "DeepInversion", "PooledSynthesizer",
           "SynthesisContext", "Synthesizer"]

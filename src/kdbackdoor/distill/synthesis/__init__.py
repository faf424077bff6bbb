"""Data-free image synthesisers, one per method, behind the ``Synthesizer`` interface.

Importing this package registers every synthesiser in ``SYNTHESIZERS``.
"""

from kdbackdoor.distill.synthesis.adversarial import AdversarialGenerator
from kdbackdoor.distill.synthesis.base import SYNTHESIZERS, PooledSynthesizer, SynthesisContext, Synthesizer
from kdbackdoor.distill.synthesis.contrastive import ContrastiveInversion
from kdbackdoor.distill.synthesis.fast_meta import FastMetaSynthesizer
from kdbackdoor.distill.synthesis.inversion import DeepInversion

__all__ = ["SYNTHESIZERS", "AdversarialGenerator", "ContrastiveInversion", "DeepInversion", "FastMetaSynthesizer", "PooledSynthesizer",
           "SynthesisContext", "Synthesizer"]

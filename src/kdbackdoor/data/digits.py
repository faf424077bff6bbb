"""The 8x8 handwritten digits shipped with scikit-learn (1,797 images, no download).

Split: within each class a fixed seeded permutation sends 20% (rounded) to test and the rest
to train, so both splits keep the class balance and are the same on every machine.
"""

from __future__ import annotations

import numpy as np

from kdbackdoor.data.source_registry import Decoded, SourceRequest, register_source

TEST_FRACTION = 0.2
SPLIT_SEED = 0
_MAX_VALUE = 16  # the data set's pixel values are counts 0..16


@register_source("digits", description="scikit-learn's 8×8 handwritten digits, grey, 10 classes; embedded, no "
                 "download; fixed 80/20 split")
def load_digits_source(request: SourceRequest) -> Decoded:
    """Digits, 1 channel, 8x8, classes "0".."9"; values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits  # here, not at the top: importing sklearn takes seconds

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    test = split_mask(labels)
    keep = test if request.split == "test" else ~test
    images = np.rint(digits.images[keep] * (255 / _MAX_VALUE)).astype(np.uint8)[:, None]
    return Decoded(images, labels[keep], [str(i) for i in range(10)])


def split_mask(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the test samples: a seeded, per-class 20% draw."""
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test[members[:round(TEST_FRACTION * len(members))]] = True
    return test

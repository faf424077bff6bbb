"""Distillation-set filters: each scores every sample and flags suspects (see ``base``).

Importing this package registers every filter.
"""

from kdbackdoor.defenses.filters import (  # noqa: F401  (registration)
    activation_clustering, brittleness, label_disagreement, reference_model, spectral, strip,
)
from kdbackdoor.defenses.filters.base import (
    AuditContext, DataFilter, FilterResult, available_filters, build_filter, score_against_provenance,
)

__all__ = ["AuditContext", "DataFilter", "FilterResult", "available_filters", "build_filter",
           "score_against_provenance"]

"""Defenses: the distillation defenses (registered by name in ``kdbackdoor.distill.hooks.DEFENSES``
on import of this package), distillation-set filters, and model scans.

Importing this package registers every distillation defense.
"""

from kdbackdoor.defenses import abd, nad, robust_kd  # noqa: F401  (registration)

"""Defenses and audits: distillation-set filters, robust distillation, model scans, ABD."""

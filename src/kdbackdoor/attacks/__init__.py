"""Attacks: poisoned training sets for backdoored teachers, poisoned distillation sets."""

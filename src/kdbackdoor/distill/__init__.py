"""Knowledge distillation: losses and distillation on a (possibly poisoned) data set."""

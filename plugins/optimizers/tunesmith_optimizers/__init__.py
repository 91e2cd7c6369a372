"""tunesmith's built-in optimizers: ``adamw`` and ``sgd`` from torch."""

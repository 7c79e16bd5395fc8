"""Distillation and evaluation of TokenButler predictors (``butler-zoo train`` / ``butler-zoo eval``)."""

"""Decide: the accuracy-budget search over recipes and layer fallbacks."""

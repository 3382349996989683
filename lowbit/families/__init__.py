"""Families: where models come from and how each kind is loaded, saved and compared —
transformers folders, `package.module:factory` sources and scikit-learn estimators."""

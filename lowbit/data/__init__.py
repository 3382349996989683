"""Data: files into datasets and batches, text into tokenized batches, and the bundled real
models and text (assets)."""

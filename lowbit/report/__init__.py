"""Reports: a Comparison as Markdown (for terminals and CI logs) and as self-contained HTML."""

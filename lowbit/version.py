"""lowbit's version, in one place (read by the package metadata and written into every manifest)."""

__version__ = "0.1.0"

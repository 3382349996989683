"""Files: the lowbit folder format (safetensors + lowbit.json, no pickle)."""

from lowbit.formats.lowbit_format import FORMAT_VERSION, MANIFEST, read_folder, write_folder

__all__ = ["FORMAT_VERSION", "MANIFEST", "read_folder", "write_folder"]

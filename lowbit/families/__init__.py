"""Families: where models come from and how each kind is loaded, saved and measured —
scikit-learn estimators, transformers folders, and plain PyTorch modules from
`package.module:factory` sources — each registered in lowbit.families.registry.

Importing this package registers them; plain torch, which takes whatever no other family or
kind claims, is asked last whatever the order of registration.
"""

from lowbit.families import torch_family as _torch_family  # noqa: F401 - registers itself
from lowbit.families import transformers as _transformers_kind  # noqa: F401 - registers itself
from lowbit.families.hf_quantizer import register_with_transformers
from lowbit.families.sklearn import family as _sklearn_family  # noqa: F401 - registers itself

register_with_transformers()  # AutoModel.from_pretrained on a lowbit folder, once transformers loads

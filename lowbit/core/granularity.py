"""Granularity: which elements share one scale — the whole tensor, one channel, or one group."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.errors import InvalidRecipeError

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class Granularity:
    """`per_tensor`, `per_channel` (along `axis`) or `group:N` (N consecutive input elements).

    Groups run along the last (input) dimension, as GPTQ/AWQ and the int4 CPU kernel expect.
    """

    kind: str
    axis: int = 0
    group_size: int = 0

    @classmethod
    def parse(cls, text: str | Granularity) -> Granularity:
        if isinstance(text, Granularity):
            return text
        if text == "per_tensor":
            return cls("per_tensor")
        match = re.fullmatch(r"per_channel(?::(-?\d+))?", text)
        if match:
            return cls("per_channel", axis=int(match.group(1) or 0))
        match = re.fullmatch(r"group:(\d+)", text)
        if match:
            group_size = int(match.group(1))
            if group_size not in SUPPORTED_GROUP_SIZES:
                raise InvalidRecipeError(
                    f"group size {group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}"
                )
            return cls("group", group_size=group_size)
        raise InvalidRecipeError(
            f"unknown granularity {text!r}; use 'per_tensor', 'per_channel', "
            "'per_channel:AXIS' or 'group:N' (N in 32, 64, 128, 256)"
        )

    def __str__(self) -> str:
        if self.kind == "group":
            return f"group:{self.group_size}"
        if self.kind == "per_channel" and self.axis != 0:
            return f"per_channel:{self.axis}"
        return self.kind

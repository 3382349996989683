"""lowbit.json's schema: every field a loader reads, typed and bounded before it is used.

A manifest is untrusted input. It is parsed with a size and depth bound, then validated field by
field (pydantic); any failure is a FormatError that names the field, so no malformed manifest can
reach a loader as a KeyError or a TypeError deep inside it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from lowbit.core import Granularity
from lowbit.errors import FormatError, LowbitError
from lowbit.nn.kernels import KERNEL_NAMES, ROW_BUCKETS
from lowbit.nn.registry import QMODULES
from lowbit.nn.spec import ACTIVATIONS, OUTPUTS, SCALE_DTYPES, SCHEMES, WEIGHT_TYPES, ZERO_POINTS
from lowbit.runtimes import RUNTIMES
from lowbit.runtimes.onnxruntime import ACTIVATION_BLOCKS
from lowbit.transform.prune import CRITERIA, PATTERNS

MAX_MANIFEST_BYTES = 64 << 20
MAX_DEPTH = 64
MAX_ENTRIES = 1 << 20

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
Timings = Annotated[list[float], Field(max_length=64)]
Count = Annotated[int, Field(ge=0, le=1 << 50)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FileEntry(Strict):
    """A file of the folder: its sha256 and size; a tensor file also lists its tensors' digests."""

    sha256: Sha256
    bytes: Count
    tensors: dict[Name, Sha256] | None = Field(None, max_length=MAX_ENTRIES)


class SpecEntry(Strict):
    """A module's LayerSpec (lowbit.nn.spec) with every value checked against what lowbit knows."""

    scheme: Literal[SCHEMES]
    weight: Literal[WEIGHT_TYPES]
    granularity: str
    symmetric: bool
    activation: Literal[ACTIVATIONS] | None = None
    kernels: dict[Literal[(*map(str, ROW_BUCKETS), "all")], Literal[KERNEL_NAMES]] = Field(max_length=8)
    scale_dtype: Literal[tuple(SCALE_DTYPES)] = "float32"
    zero_point: Literal[ZERO_POINTS] = "int"
    output: Literal[OUTPUTS] = "uint8"

    @field_validator("granularity")
    @classmethod
    def _known_granularity(cls, value: str) -> str:
        try:
            return str(Granularity.parse(value))
        except LowbitError as error:
            raise ValueError(str(error)) from None


class ModuleEntry(Strict):
    type: str
    spec: SpecEntry
    bytes: Count

    @field_validator("type")
    @classmethod
    def _registered(cls, value: str) -> str:
        known = [kind.quantized.__name__ for kind in QMODULES.values()]
        if value not in known:
            raise ValueError(f"{value!r} is not a quantized module lowbit knows ({', '.join(known)})")
        return value


class ModelEntry(Strict):
    """What was quantized: a transformers class (rebuilt from config.json) or a plain module."""

    kind: Literal["torch", "transformers"]
    class_name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")] = Field(
        alias="class")
    factory: Name | None = None
    source_path: str | None = None


class SourceEntry(Strict):
    class_name: Name = Field(alias="class")
    parameters: Count
    bytes: Count
    sha256: Sha256


class OnnxEntry(Strict):
    """What the onnxruntime runtime runs: the folder's ONNX graph and how it was built."""

    file: Name = "model.onnx"
    accuracy_level: int = Field(0, ge=0, le=4)
    activation_block: Literal[ACTIVATION_BLOCKS] | None = None
    ops: dict[Name, Name] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    # inputs of more tokens (rows) than this run on int8 matrix kernels (lowbit.runtimes.onnx_large_inputs)
    large_inputs_above: int | None = Field(None, ge=0, le=1 << 30)
    large_input_timing: dict[Name, Timings] | None = Field(None, max_length=3)  # what set that limit


class RoundingEntry(Strict):
    """A rounding point (lowbit.nn.rounding): an 8-bit grid a module's output is rounded onto."""

    scale: float = Field(gt=0, allow_inf_nan=False)
    zero_point: int = Field(ge=0, le=255)


class SparseEntry(Strict):
    """A tensor stored as a bitmask and its kept values (lowbit.formats.sparse)."""

    dtype: Literal["I8", "U8", "I32", "F32", "F16", "BF16"]
    shape: list[Count] = Field(min_length=1, max_length=8)
    kept: Count


class PruningEntry(Strict):
    """What lowbit.prune did: its pattern, the sparsity asked (and asked of the modules some globs
    match), what scored the weights, and each module's share of zeros."""

    pattern: str
    sparsity: float = Field(ge=0, lt=1)
    criterion: str
    modules: dict[Name, Annotated[float, Field(ge=0, le=1)]] = Field(max_length=MAX_ENTRIES)
    overrides: dict[Name, Annotated[float, Field(ge=0, lt=1)]] = Field(default_factory=dict, max_length=64)

    @field_validator("pattern")
    @classmethod
    def _registered(cls, value: str) -> str:
        return PATTERNS.known(value)

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, value: str) -> str:
        return CRITERIA.known(value)


class Manifest(Strict):
    format: Literal["lowbit"]
    format_version: int
    versions: dict[Name, Name] = Field(max_length=16)
    model: ModelEntry
    source: SourceEntry | None = None
    recipe: dict[str, Any] | None = None
    modules: dict[Name, ModuleEntry] = Field(max_length=MAX_ENTRIES)
    folded: dict[Name, Name] = Field(default_factory=dict, max_length=MAX_ENTRIES)  # {batch norm: conv}
    # {module: [low, high]} of the clamping activation fused into its static output grid (high None: ReLU)
    fused: dict[Name, tuple[float, float | None]] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    roundings: dict[Name, RoundingEntry] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    comparison: dict[str, Any] | None = None
    training: dict[str, Any] | None = None  # what quantization-aware training did (lowbit.qat)
    pruning: PruningEntry | None = None
    sparse: dict[Name, SparseEntry] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    runtime: str = "eager"
    onnx: OnnxEntry | None = None
    runtime_choice: dict[str, Any] | None = None  # what `runtime="auto"` measured, and why it chose
    files: dict[Name, FileEntry] = Field(min_length=1, max_length=4096)
    aliases: dict[Name, Name] = Field(default_factory=dict, max_length=MAX_ENTRIES)

    @field_validator("runtime")
    @classmethod
    def _registered_runtime(cls, value: str) -> str:
        return RUNTIMES.known(value)


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply JSON nests (counted up to just past `limit`), walked without recursion: a
    3,000-deep file must not overflow the stack."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        node, level = stack.pop()
        deepest = max(deepest, level)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, level + 1) for child in children)
    return deepest


def parse_json(data: bytes, what: str, max_depth: int | None = MAX_DEPTH) -> Any:
    """JSON from bytes: UTF-8, and at most `max_depth` deep unless that is None (for a reader
    that bounds its own recursion); anything else is a FormatError."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise FormatError(f"{what} is not valid JSON: {type(error).__name__}: {error}") from None
    if max_depth is not None and depth(value, max_depth) > max_depth:
        raise FormatError(f"{what} nests deeper than {max_depth} levels")
    return value


def validate(schema: type[BaseModel], value: Any, what: str) -> dict[str, Any]:
    """`value` as a plain dict after `schema` checked every field; a FormatError names the first
    field that fails."""
    try:
        return schema.model_validate(value).model_dump(by_alias=True, exclude_none=False)
    except ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        raise FormatError(f"{what}: field {field}: {problem['msg']}") from None


def validate_manifest(value: Any, what: str) -> dict[str, Any]:
    """A torch folder's manifest as a plain dict, after every field is checked (see `Manifest`)."""
    return validate(Manifest, value, what)

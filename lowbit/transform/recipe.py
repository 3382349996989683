"""Recipe: a typed, validated quantization config, with named presets; round-trips through JSON."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lowbit.algorithms import ALGORITHMS
from lowbit.core import CALIBRATORS, Granularity
from lowbit.core.cpu import has_vnni
from lowbit.errors import InvalidRecipeError
from lowbit.nn.spec import LayerSpec

Scheme = Literal["weight_only", "dynamic", "static"]
WeightType = Literal["int8", "int5", "int4", "fp16", "bf16"]


class Recipe(BaseModel):
    """How to quantize a model: scheme, weight type, granularity, calibration, skips and overrides.

    `dynamic` and `static` are W8A8 (int8 weights, 8-bit activations at run time or calibrated);
    `weight_only` stores weights in `weights` and computes in float. `embeddings` also quantizes
    embedding tables (weight-only) so a BERT's vocabulary shrinks too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Scheme = "weight_only"
    weights: WeightType = "int8"
    granularity: str = "per_channel"
    symmetric: bool = True
    calibrator: str = "percentile"
    percentile: float = Field(99.99, gt=50.0, le=100.0)
    algorithm: str = "rtn"  # a name in lowbit.algorithms.ALGORITHMS
    smoothing: float | None = Field(None, gt=0.0, lt=1.0)  # SmoothQuant's α (lowbit.transform.smooth)
    # bits of a dynamic Linear's activations: 8 needs VNNI to run on fbgemm (7 cannot saturate
    # without it); None takes 8 on a CPU with VNNI, else 7 (the choice is saved in each spec)
    activation_bits: Literal[7, 8] | None = None
    # what weight scales may be: "float16" gives the values GGUF's blocks hold, so a model
    # quantized with them exports to llama.cpp exactly (lowbit export --format gguf)
    scale_dtype: Literal["float32", "float16"] = "float32"
    # an asymmetric int4 grid's offset: "auto", integer zero points (HQQ: floats it optimises);
    # "minimum", each group's levels start at a float minimum, x = q · scale + minimum, held in
    # `scale_dtype` (llama.cpp's Q4_1 blocks)
    zero_point: Literal["auto", "minimum"] = "auto"
    embeddings: bool = True
    skip: tuple[str, ...] = ()
    overrides: dict[str, Recipe] = Field(default_factory=dict)

    @field_validator("granularity")
    @classmethod
    def _known_granularity(cls, value: str) -> str:
        return str(Granularity.parse(value))

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        return ALGORITHMS.known(value)

    @field_validator("calibrator")
    @classmethod
    def _known_calibrator(cls, value: str) -> str:
        if value not in CALIBRATORS and value != "auto":
            raise ValueError(f"unknown calibrator {value!r}; choose one of auto, {', '.join(CALIBRATORS)}")
        return value

    @field_validator("overrides", mode="before")
    @classmethod
    def _presets_in_overrides(cls, value: dict) -> dict:
        if not isinstance(value, dict):
            return value
        unknown = [r for r in value.values() if isinstance(r, str) and r not in PRESETS]
        if unknown:
            raise ValueError(f"unknown preset {unknown[0]!r} in overrides; use one of {', '.join(PRESETS)}")
        return {p: PRESETS[r] if isinstance(r, str) else r for p, r in value.items()}

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.scheme in ("dynamic", "static"):
            if self.weights != "int8" or not self.symmetric:
                raise ValueError(f"scheme {self.scheme!r} needs symmetric int8 weights")
            if self.granularity not in ("per_channel", "per_tensor"):
                raise ValueError(f"scheme {self.scheme!r} needs per_channel or per_tensor weights")
        if self.weights in ("int4", "int5") and not self.granularity.startswith("group"):
            raise ValueError(f"{self.weights} weights need a group granularity, e.g. 'group:128'")
        if self.zero_point == "minimum" and (self.weights != "int4" or self.symmetric):
            raise ValueError("zero_point 'minimum' is for asymmetric int4 groups (symmetric: false)")
        if self.zero_point == "minimum" and ALGORITHMS.get(self.algorithm).float_zero_points:
            raise ValueError(f"the {self.algorithm!r} algorithm optimises its own float zero points; "
                             "it cannot round onto a grid with a minimum (zero_point 'minimum')")
        return self

    def layer_spec(self, kind: str = "linear") -> LayerSpec:
        """The LayerSpec this recipe gives a Linear, Conv2d or Embedding module."""
        if self.weights in ("fp16", "bf16"):
            return LayerSpec("weight_only", self.weights, "per_tensor", True)
        scales = self.scale_dtype
        zeros = ("minimum" if self.zero_point == "minimum" else
                 "float" if ALGORITHMS.get(self.algorithm).float_zero_points and self.weights == "int4"
                 and not self.symmetric else "int")
        if kind == "embedding":
            granularity = self.granularity if self.granularity.startswith("group:") else "per_channel"
            return LayerSpec("weight_only", self.weights, granularity, self.symmetric, scale_dtype=scales,
                             zero_point=zeros if granularity.startswith("group:") else "int")
        if kind == "conv" and self.scheme == "dynamic":
            return LayerSpec("weight_only", "int8", "per_channel", True, scale_dtype=scales)
        activation = None if self.scheme == "weight_only" else "uint8-full" if kind == "conv" else "uint8"
        if self.scheme == "dynamic" and kind == "linear" and self._dynamic_bits() == 8:
            activation = "uint8-full"
        return LayerSpec(self.scheme, self.weights, self.granularity, self.symmetric, activation,
                         scale_dtype=scales, zero_point=zeros)

    def _dynamic_bits(self) -> int:
        return self.activation_bits or (8 if has_vnni() else 7)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            return cls.model_validate(json.loads(text))
        except (ValidationError, json.JSONDecodeError) as error:
            raise InvalidRecipeError(f"invalid recipe JSON: {error}") from None


PRESETS: dict[str, dict] = {
    "w8a8-dynamic": {"scheme": "dynamic", "weights": "int8", "granularity": "per_channel"},
    "w8a8-static": {"scheme": "static", "weights": "int8", "granularity": "per_channel"},
    # the weights rounded by GPTQ against the calibration inputs (convolutions' patches too):
    # a CNN's int8 weights lose less (bench/README.md, issue 15's EfficientNet section)
    "w8a8-static-gptq": {"scheme": "static", "weights": "int8", "granularity": "per_channel",
                         "algorithm": "gptq"},
    "w8": {"scheme": "weight_only", "weights": "int8", "granularity": "per_channel"},
    "w4": {"scheme": "weight_only", "weights": "int4", "granularity": "group:128",
           "symmetric": False},
    "w4-g64": {"scheme": "weight_only", "weights": "int4", "granularity": "group:64",
               "symmetric": False},
    "w4-g32": {"scheme": "weight_only", "weights": "int4", "granularity": "group:32",
               "symmetric": False},
    # GPTQ (lowbit.algorithms.gptq) needs calibration text; groups of 64 divide more hidden
    # sizes than 128 (SmolLM2's 576 among them)
    "w4-gptq": {"scheme": "weight_only", "weights": "int4", "granularity": "group:64",
                "symmetric": False, "algorithm": "gptq"},
    # HQQ (lowbit.algorithms.hqq): calibration-free, float zero points optimised per group
    "w4-hqq": {"scheme": "weight_only", "weights": "int4", "granularity": "group:64",
               "symmetric": False, "algorithm": "hqq"},
    # AWQ (lowbit.algorithms.awq): activation-aware scaling folded into the model, then rounding
    # to nearest; calibration text as for GPTQ
    "w4-awq": {"scheme": "weight_only", "weights": "int4", "granularity": "group:64",
               "symmetric": False, "algorithm": "awq"},
    "w4-awq-gptq": {"scheme": "weight_only", "weights": "int4", "granularity": "group:64",
                    "symmetric": False, "algorithm": "awq-gptq"},
    # llama.cpp's block types (lowbit export --format gguf): groups of 32 with float16 scales; the
    # LM head and embedding table stay 8-bit, as llama.cpp keeps its output tensor above 4 bits
    "q8_0": {"scheme": "weight_only", "weights": "int8", "granularity": "group:32", "scale_dtype": "float16"},
    "q5_0": {"scheme": "weight_only", "weights": "int5", "granularity": "group:32", "scale_dtype": "float16",
             "overrides": {"lm_head": "q8_0", "*embed_tokens": "q8_0"}},
    "q5_0-gptq": {"scheme": "weight_only", "weights": "int5", "granularity": "group:32",
                  "scale_dtype": "float16", "algorithm": "gptq",
                  "overrides": {"lm_head": "q8_0", "*embed_tokens": "q8_0"}},
    "q5_0-awq-gptq": {"scheme": "weight_only", "weights": "int5", "granularity": "group:32",
                      "scale_dtype": "float16", "algorithm": "awq-gptq",
                      "overrides": {"lm_head": "q8_0", "*embed_tokens": "q8_0"}},
    "q4_0": {"scheme": "weight_only", "weights": "int4", "granularity": "group:32", "scale_dtype": "float16",
             "overrides": {"lm_head": "q8_0", "*embed_tokens": "q8_0"}},
    "q4_0-gptq": {"scheme": "weight_only", "weights": "int4", "granularity": "group:32",
                  "scale_dtype": "float16", "algorithm": "gptq",
                  "overrides": {"lm_head": "q8_0", "*embed_tokens": "q8_0"}},
    "q4_0-awq-gptq": {"scheme": "weight_only", "weights": "int4", "granularity": "group:32",
                      "scale_dtype": "float16", "algorithm": "awq-gptq",
                      "overrides": {"lm_head": "q8_0", "*embed_tokens": "q8_0"}},
    # Q4_1: asymmetric, each group's float16 minimum and scale (x = q · scale + minimum)
    "q4_1": {"scheme": "weight_only", "weights": "int4", "granularity": "group:32", "symmetric": False,
             "scale_dtype": "float16", "zero_point": "minimum",
             "overrides": {"lm_head": "q8_0", "*embed_tokens": "q8_0"}},
    "q4_1-gptq": {"scheme": "weight_only", "weights": "int4", "granularity": "group:32", "symmetric": False,
                  "scale_dtype": "float16", "zero_point": "minimum", "algorithm": "gptq",
                  "overrides": {"lm_head": "q8_0", "*embed_tokens": "q8_0"}},
    "q4_1-awq-gptq": {"scheme": "weight_only", "weights": "int4", "granularity": "group:32",
                      "symmetric": False, "scale_dtype": "float16", "zero_point": "minimum",
                      "algorithm": "awq-gptq", "overrides": {"lm_head": "q8_0", "*embed_tokens": "q8_0"}},
    "fp16": {"scheme": "weight_only", "weights": "fp16", "granularity": "per_tensor"},
    "bf16": {"scheme": "weight_only", "weights": "bf16", "granularity": "per_tensor"},
}


def make_recipe(recipe: Recipe | str | dict | None = None, **changes) -> Recipe:
    """A Recipe from a preset name, a JSON-like dict or a Recipe, with `changes` applied on top."""
    if recipe is None:
        recipe = "w8a8-dynamic"
    if isinstance(recipe, str):
        if recipe not in PRESETS:
            raise InvalidRecipeError(
                f"unknown recipe {recipe!r}; presets are {', '.join(PRESETS)} "
                "(or pass a lowbit.Recipe)"
            )
        recipe = PRESETS[recipe]
    base = recipe.model_dump() if isinstance(recipe, Recipe) else dict(recipe)
    base.update({key: value for key, value in changes.items() if value is not None})
    try:
        return Recipe.model_validate(base)
    except ValidationError as error:
        problems = "; ".join(e["msg"] for e in error.errors())
        raise InvalidRecipeError(f"invalid recipe: {problems}") from None

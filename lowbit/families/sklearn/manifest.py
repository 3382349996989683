"""lowbit.json of a scikit-learn file: every field typed and bounded before anything reads it (which
bounds its nesting too: no field holds free-form JSON)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StringConstraints, model_validator

from lowbit.formats.manifest import Count, Name, Sha256, Strict, validate

ENTRY_PATTERN = r"^(skeleton\.json|arrays\.safetensors|vocabulary/(0|[1-9][0-9]{0,5})\.txt)$"
EntryName = Annotated[str, StringConstraints(pattern=ENTRY_PATTERN)]
Limited = Field(max_length=1 << 20)
Output = StrictBool | StrictInt | StrictFloat | Annotated[str, StringConstraints(max_length=1024)] | None


class HeldOut(Strict):
    """The guard's check on reference rows its climb did not see (lowbit.families.sklearn.guard)."""

    rows: Count
    changed: Count
    rate: float = Field(ge=0, le=1)
    ci95: list[float] = Field(min_length=2, max_length=2)
    estimated_flip_rate: float = Field(ge=0, le=1)
    max_probability_difference: float
    refit_on_all: bool = False  # rows changed there, so the guard climbed on every row after


class Report(Strict):
    """What quantizing did: the fidelity check's result and each array's encoding."""

    bits: Literal[8, 16, 32]
    verified: bool
    prediction_differences: Count | None
    max_probability_difference: float | None
    held_out: HeldOut | None = None
    fallbacks: dict[Name, list[Name]] = Limited
    kept_float: list[Name] = Limited
    encodings: dict[Name, Name] = Limited
    pruned: dict[Name, float] = Limited


class Probe(Strict):
    """Predictions on synthetic rows, made again at load (lowbit.families.sklearn.probe)."""

    method: Literal["predict", "transform"] | None
    outputs: list[Output] | None = Field(None, max_length=1 << 16)


class SklearnManifest(Strict):
    format: Literal["lowbit-sklearn"]
    version: Literal[2, 3]
    estimator: Name
    report: Report
    sha256: dict[EntryName, Sha256] = Field(max_length=1 << 16)
    sizes: dict[EntryName, Count] = Field(default_factory=dict, max_length=1 << 16)
    versions: dict[Name, Name] = Field(default_factory=dict, max_length=16)
    probe: Probe | None = None

    @model_validator(mode="after")
    def _lists_both_main_entries(self) -> SklearnManifest:
        if not {"skeleton.json", "arrays.safetensors"} <= set(self.sha256):
            raise ValueError("sha256 must list skeleton.json and arrays.safetensors")
        return self


def validate_manifest(value: Any, what: str) -> dict[str, Any]:
    return validate(SklearnManifest, value, what)

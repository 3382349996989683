"""Distillation without labels: the float model teaches its quantized (fake-quant) copy to give
the same outputs (Hinton et al., 2015; as NNCF's QAT with distillation).

The loss follows the output: KL divergence of the output distributions for classifiers and
language models (logits), and for encoders the mean squared error of the token states plus one
minus the cosine of the mean-pooled sentence embeddings; "layers" adds every intermediate
layer's token states (a transformers model's hidden states, as TinyBERT's layer-wise
distillation), which guides a pruned encoder more than its last layer alone. Adam with a
learning rate that decays linearly to zero over the step or time budget: a quantized weight then
settles on one side of its rounding boundary instead of flipping at the last step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.data.batches import call_model, text_batches
from lowbit.errors import LowbitError
from lowbit.progress import progress_bar
from lowbit.registry import Registry
from lowbit.transform.prune import keep_pruned_zeros
from lowbit.transform.qat import QAT_ATTRIBUTE, refuse_integer_modules

LOG = logging.getLogger("lowbit")
TEACHER_CACHE_BYTES = 512 << 20  # teacher outputs kept across epochs up to this size, else recomputed
CURVE_POINTS = 100  # loss points kept for a report


class DistillationError(LowbitError):
    """Distillation cannot run as asked (no budget, outputs that do not match, no data)."""


Loss = Callable[[Any, Any, dict | None], torch.Tensor]
LOSSES: Registry[Loss] = Registry("distillation loss")


def _mask(batch: Any, like: torch.Tensor) -> torch.Tensor:
    """1 for real tokens, 0 for padding ([batch, positions, 1]); all ones without a mask."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None or mask.shape != like.shape[:2]:
        return torch.ones(*like.shape[:-1], 1, dtype=like.dtype)
    return mask[..., None].to(like.dtype)


@LOSSES.register("kl")
def kl_loss(student: torch.Tensor, teacher: torch.Tensor, batch: Any) -> torch.Tensor:
    """KL(teacher ‖ student) of the softmax over the last dimension, averaged over real positions."""
    mask = _mask(batch, teacher) if teacher.dim() == 3 else torch.ones(*teacher.shape[:-1], 1)
    per_position = F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1),
                            log_target=True, reduction="none").sum(-1, keepdim=True)
    return (per_position * mask).sum() / mask.sum()


@LOSSES.register("embedding")
def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, batch: Any) -> torch.Tensor:
    """Token states' squared error relative to the teacher's mean square, plus 1 − cosine of the
    mean-pooled sentence embeddings (what a sentence encoder is judged by)."""
    mask = _mask(batch, teacher)
    relative = _relative_squared_error(student, teacher, mask)

    def pooled(hidden: torch.Tensor) -> torch.Tensor:
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return relative + (1 - F.cosine_similarity(pooled(student), pooled(teacher), dim=-1)).mean()


@LOSSES.register("layers")
def layers_loss(student: torch.Tensor, teacher: torch.Tensor, batch: Any) -> torch.Tensor:
    """The embedding loss on the last layer's token states plus the mean relative squared error of
    the intermediate layers' ([layers + 1, batch, positions, width]: the embeddings' output first)."""
    mask = _mask(batch, teacher[-1])
    inner = [_relative_squared_error(s, t, mask) for s, t in zip(student[1:-1], teacher[1:-1], strict=True)]
    return embedding_loss(student[-1], teacher[-1], batch) + sum(inner) / max(len(inner), 1)


layers_loss.hidden_states = True  # the models are called for all their layers' states


def _relative_squared_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error over real positions, relative to the teacher's square there."""
    return ((student - teacher) ** 2 * mask).sum() / ((teacher ** 2) * mask).sum().clamp(min=1e-12)


@LOSSES.register("mse")
def mse_loss(student: torch.Tensor, teacher: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.mse_loss(student.float(), teacher.float())


def judged_output(output: Any) -> tuple[torch.Tensor, str]:
    """The tensor distillation matches and the loss that suits it: logits → "kl", a last hidden
    state → "embedding", a plain tensor → "kl" over its last dimension (a classifier's scores)."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits, "kl"
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden, "embedding"
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if isinstance(output, torch.Tensor) and output.dim() >= 2:
        return output, "kl"
    raise DistillationError("cannot find logits or hidden states in the model's output "
                            f"({type(output).__name__})")


def judged(model: nn.Module, batch: Any, hidden_states: bool) -> tuple[torch.Tensor, str]:
    """What distillation matches of the model's output on `batch`, and the loss that suits it
    (judged_output); with `hidden_states`, every layer's token states stacked
    ([layers + 1, batch, positions, width]), for the "layers" loss."""
    if not hidden_states:
        return judged_output(call_model(model, batch))
    if not isinstance(batch, dict):
        raise DistillationError("the 'layers' loss reads a transformers model's hidden states: it needs "
                                "batches of keyword inputs (texts with tokenizer=)")
    states = getattr(model(**batch, output_hidden_states=True), "hidden_states", None)
    if not states:
        raise DistillationError("the model gives no hidden states (output_hidden_states=True): "
                                "use loss='embedding' or 'kl'")
    return torch.stack(states), "layers"


@dataclass
class DistillResult:
    """What distillation did: steps, seconds, which loss ("kl", "embedding", "layers", "mse"), the loss
    curve (step, seconds, mean loss since the previous point), at most CURVE_POINTS points."""

    steps: int
    seconds: float
    loss: str
    curve: list[tuple[int, float, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "distillation", "loss": self.loss, "steps": self.steps,
                "seconds": round(self.seconds, 1), "curve": [list(point) for point in self.curve]}


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Sequence[Any],
    steps: int | None = None,
    time_budget: float | None = None,
    tokenizer: Any = None,
    lr: float = 5e-5,
    batch_size: int = 16,
    max_length: int = 128,
    loss: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> DistillResult:
    """Train `student` (a model from `lowbit.qat.prepare`, or any float model) to reproduce
    `teacher`'s outputs on `data`, for `steps` optimizer steps or `time_budget` seconds, whichever
    ends first; no labels are used. `data` is a list of batches (dicts of tensors or tensors), or
    of texts with `tokenizer`. The student trains in eval mode (no dropout: it matches the
    teacher's deterministic outputs); the result is also recorded for `lowbit.qat.convert`. A
    pruned student's zeros stay zero (lowbit.prune).
    """
    refuse_integer_modules(student, "distill into this model")
    if steps is None and time_budget is None:
        raise DistillationError("give a budget: steps=N or time_budget=SECONDS "
                                "(CLI: --steps or --time-budget)")
    if (steps is not None and steps < 1) or (time_budget is not None and time_budget <= 0):
        raise DistillationError("the step and time budgets must be positive")
    batches = _batches(data, tokenizer, batch_size, max_length)
    layers = getattr(LOSSES.get(loss), "hidden_states", False) if loss != "auto" else False
    outputs = _Teacher(teacher, batches, layers)
    chosen = _check_outputs(student, outputs, batches[0], loss, layers)
    parameters = [p for p in student.parameters() if p.requires_grad]
    if not parameters:
        raise DistillationError("the student has no trainable parameters")
    optimizer = torch.optim.Adam(parameters, lr=lr)
    result = _train(student, batches, outputs, chosen, optimizer, lr, _Budget(steps, time_budget), seed,
                    progress, after_step=keep_pruned_zeros(student), layers=layers)
    state = getattr(student, QAT_ATTRIBUTE, None)
    if state is not None:
        state.training = result.to_dict()
    return result


def _batches(data: Sequence[Any], tokenizer: Any, batch_size: int, max_length: int) -> list[Any]:
    """Model inputs from `data`: batches as given (labels dropped), texts tokenized."""
    data = list(data) if data is not None else []
    if not data:
        raise DistillationError("no training data: pass a list of batches, or texts with tokenizer=")
    if all(isinstance(item, str) for item in data):
        if tokenizer is None:
            raise DistillationError("text data needs tokenizer= (the model's tokenizer)")
        return text_batches(tokenizer, data, batch_size, max_length)
    return [{k: v for k, v in b.items() if k != "labels"} if isinstance(b, dict) else b for b in data]


class _Teacher:
    """The teacher's judged output per batch, computed without gradients; kept after the first
    epoch while they fit in TEACHER_CACHE_BYTES, recomputed otherwise (an LM's logits)."""

    def __init__(self, teacher: nn.Module, batches: list[Any], layers: bool) -> None:
        self.teacher, self.cache, self.keep, self.layers = teacher, {}, None, layers
        self.count = len(batches)

    def __call__(self, index: int, batch: Any) -> torch.Tensor:
        if index in self.cache:
            return self.cache[index]
        was_training = self.teacher.training
        self.teacher.eval()
        with torch.no_grad():
            output = judged(self.teacher, batch, self.layers)[0].detach()
        self.teacher.train(was_training)
        if self.keep is None:
            self.keep = output.numel() * output.element_size() * self.count <= TEACHER_CACHE_BYTES
        if self.keep:
            self.cache[index] = output
        return output


def _check_outputs(student: nn.Module, teacher: _Teacher, batch: Any, loss: str, layers: bool) -> str:
    """The loss to use; refuses data the models cannot run on, and a teacher and student whose
    outputs differ in shape."""
    try:
        expected = teacher(0, batch)
        with torch.no_grad():
            got, suited = judged(student, batch, layers)
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistillationError(f"the models cannot run on the first training batch: {first}") from None
    if got.shape != expected.shape:
        raise DistillationError(f"the teacher's output has shape {tuple(expected.shape)} but the "
                                f"student's has {tuple(got.shape)}: distillation needs the same model "
                                "before and after quantization")
    chosen = suited if loss == "auto" else loss
    LOSSES.get(chosen)  # an unknown name is a clear error here
    return chosen


def _train(student: nn.Module, batches: list[Any], teacher: _Teacher, loss: str,
           optimizer: torch.optim.Optimizer, lr: float, budget: _Budget, seed: int,
           progress: bool, after_step: Callable[[], None], layers: bool) -> DistillResult:
    generator = torch.Generator().manual_seed(seed)
    loss_fn, curve = LOSSES.get(loss), _Curve()
    was_training = student.training
    student.eval()
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("distilling", total=100)
            while not budget.spent():
                for index in torch.randperm(len(batches), generator=generator).tolist():
                    for group in optimizer.param_groups:
                        group["lr"] = lr * (1.0 - budget.share())
                    output = judged(student, batches[index], layers)[0]
                    value = loss_fn(output, teacher(index, batches[index]), batches[index])
                    optimizer.zero_grad(set_to_none=True)
                    value.backward()
                    optimizer.step()
                    after_step()
                    budget.step += 1
                    curve.add(budget, float(value.detach()), bar, task)
                    if budget.spent():
                        break
    finally:
        student.train(was_training)
    return DistillResult(budget.step, budget.seconds(), loss, curve.finish(budget))


class _Budget:
    """Steps taken against a step budget, a time budget, or both (whichever ends first)."""

    def __init__(self, steps: int | None, seconds: float | None) -> None:
        self.steps, self.limit, self.start, self.step = steps, seconds, time.monotonic(), 0

    def seconds(self) -> float:
        return time.monotonic() - self.start

    def share(self) -> float:
        shares = [self.step / self.steps] if self.steps else []
        if self.limit:
            shares.append(self.seconds() / self.limit)
        return min(1.0, max(shares))

    def spent(self) -> bool:
        return self.share() >= 1.0


class _Curve:
    """The loss averaged over each 1/CURVE_POINTS of the budget, as (step, seconds, loss); each
    tenth of the budget also moves the progress display with the loss (a line in a log)."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float]] = []
        self.window: list[float] = []
        self.shown = 0

    def add(self, budget: _Budget, value: float, bar: Any, task: int) -> None:
        self.window.append(value)
        share = budget.share()
        if int(share * CURVE_POINTS) > len(self.points):
            self._close(budget)
        percent = int(share * 100)
        if percent > self.shown:
            tenth = percent // 10 > self.shown // 10
            description = f"distilling, loss {self.points[-1][2]:.4g}" if tenth and self.points else None
            bar.update(task, advance=percent - self.shown, description=description)
            if description:
                LOG.info("%s (%d%% of the budget)", description, percent)
            self.shown = percent

    def _close(self, budget: _Budget) -> None:
        if self.window:
            self.points.append((budget.step, round(budget.seconds(), 2), sum(self.window) / len(self.window)))
            self.window = []

    def finish(self, budget: _Budget) -> list[tuple[int, float, float]]:
        self._close(budget)
        return self.points

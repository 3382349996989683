"""Folding before quantizing: batch norm into the convolution before it, a clamping activation
(ReLU, ReLU6, Hardtanh) into the static output grid of the module before it, and one grid per
tensor between a quantized module and the convolution that reads its output.

Why: the static scheme rounds each module's output on a calibrated grid. Unfolded, a convolution's
output is rounded before batch norm rescales every channel, and on a grid that spends most of its
levels on values ReLU6 then throws away; its consumer then rounds the same tensor a second time on
a grid of its own. On EfficientNet-Lite0 (bench.efficientnet) the three took top-1 agreement with
fp32 from 0.65 to 0.85-0.90, and they let ONNX Runtime chain its int8 convolutions without leaving
int8. Where a convolution reads a tensor no quantized module made (a residual sum), `tensor_sources`
finds the module that made it, whose output is then rounded once on the convolution's input grid
(lowbit.nn.rounding).

`trace_links(model)` reads the model's dataflow with torch.fx, Linear, Conv2d, BatchNorm2d and
activation modules kept whole. A model fx cannot trace (data-dependent control flow, most
transformers) folds nothing; the reason is logged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.nn.kinds import set_module

LOG = logging.getLogger("lowbit")
WEIGHTED = (nn.Conv2d, nn.Linear)
PASS_THROUGH = (nn.Identity, nn.Dropout)  # identities in eval mode


def clamp_range(module: nn.Module) -> tuple[float, float] | None:
    """The interval a clamping activation maps every input into, or None for other modules."""
    if isinstance(module, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    if isinstance(module, nn.ReLU):
        return 0.0, float("inf")
    return None


@dataclass
class Links:
    """What folds in a model, by module name.

    `batch_norms`: {batch norm (with running statistics): the Conv2d whose output only it reads}.
    `activations`: {Linear or Conv2d: (low, high)} of the clamping activation that alone reads its
    output (after a folded batch norm).
    `producers`: {Conv2d: the Linear or Conv2d whose output it reads, through nothing but folded
    batch norms, fused activations and identities}: the two share one grid for that tensor.
    """

    batch_norms: dict[str, str] = field(default_factory=dict)
    activations: dict[str, tuple[float, float]] = field(default_factory=dict)
    producers: dict[str, str] = field(default_factory=dict)


class _LeafTracer:
    """A torch.fx tracer that keeps the modules folding looks at whole (also subclasses such as
    EfficientNet's same-padding Conv2d, which fx would otherwise trace into)."""

    def __new__(cls):
        import torch.fx

        class Tracer(torch.fx.Tracer):
            def is_leaf_module(self, module: nn.Module, name: str) -> bool:
                keep = (*WEIGHTED, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, *PASS_THROUGH)
                return isinstance(module, keep) or super().is_leaf_module(module, name)

        return Tracer()


def trace_links(model: nn.Module) -> Links:
    """The folds `model` allows (none when fx cannot trace it)."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # noqa: BLE001 - fx raises many untyped errors on dynamic code
        LOG.info("folding: fx cannot trace %s (%s); nothing folded", type(model).__name__,
                 str(error).splitlines()[0][:160] if str(error) else type(error).__name__)
        return Links()
    modules = dict(model.named_modules())

    def module_of(node) -> nn.Module | None:
        return modules.get(node.target) if node.op == "call_module" else None

    links = Links()
    for node in graph.nodes:  # batch norms first: the walks below step over the folded ones
        source = node.args[0] if node.args else None
        norm = module_of(node)
        if (isinstance(norm, nn.BatchNorm2d) and norm.running_var is not None and source is not None
                and isinstance(module_of(source), nn.Conv2d) and len(source.users) == 1):
            links.batch_norms[node.target] = source.target
    for node in graph.nodes:
        bounds = clamp_range(module_of(node)) if module_of(node) is not None else None
        if bounds is not None:
            source = _through(node.args[0], module_of, links, sole_user=True)
            if source is not None and isinstance(module_of(source), WEIGHTED):
                links.activations[source.target] = bounds
    for node in graph.nodes:
        if isinstance(module_of(node), nn.Conv2d):
            source = _through(node.args[0], module_of, links, sole_user=False)
            if source is not None and isinstance(module_of(source), WEIGHTED):
                links.producers[node.target] = source.target
    return links


def _through(node, module_of, links: Links, sole_user: bool):
    """The node that really produced `node`'s value, stepping back over folded batch norms and
    identities (and, when not `sole_user`, the activation fused into that producer). With
    `sole_user`, every step must be the only reader of the one before."""
    while node is not None and hasattr(node, "op"):
        module = module_of(node)
        if sole_user and len(node.users) != 1:
            return None
        if module is None:
            return node
        folded_norm = node.target in links.batch_norms
        if isinstance(module, PASS_THROUGH) or folded_norm:
            node = node.args[0]
            continue
        if not sole_user and clamp_range(module) is not None:
            source = _through(node.args[0], module_of, links, sole_user=False)
            fused = source is not None and links.activations.get(source.target) == clamp_range(module)
            return source if fused else node
        return node
    return None


def fold_batch_norms(model: nn.Module, batch_norms: dict[str, str]) -> None:
    """Fold each batch norm into its convolution (in place): the convolution takes the norm's
    per-channel scale and shift, and the norm becomes an Identity."""
    for norm_name, conv_name in batch_norms.items():
        norm, conv = model.get_submodule(norm_name), model.get_submodule(conv_name)
        with torch.no_grad():
            gain = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
            shift = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
            factor = gain / torch.sqrt(norm.running_var + norm.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            conv.weight.mul_(factor.reshape(-1, *[1] * (conv.weight.dim() - 1)))
            conv.bias = nn.Parameter((bias - norm.running_mean) * factor + shift)
        set_module(model, norm_name, nn.Identity())


def folded_structure(model: nn.Module, batch_norms: dict[str, str]) -> nn.Module:
    """A skeleton shaped like a model whose batch norms were folded (to load its tensors into):
    each named norm an Identity, its convolution with a bias."""
    for norm_name, conv_name in batch_norms.items():
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        set_module(model, norm_name, nn.Identity())
    return model


def links_for(model: nn.Module, names: list[str]) -> Links:
    """The folds for quantizing the named modules: traced only when one of them is a Conv2d or
    the model has a clamping activation module (no other model has a batch norm, a convolution or
    an activation to fold)."""
    modules = dict(model.named_modules())
    convolutions = any(isinstance(modules.get(name), nn.Conv2d) for name in names)
    if not convolutions and not any(clamp_range(module) is not None for module in modules.values()):
        return Links()
    return trace_links(model)


def share_grids(ranges: dict[str, dict], links: Links) -> dict[str, list[float]]:
    """Static ranges (in place) after fusing: an output range clamped to its fused activation's
    interval, and a convolution reading a quantized module's output on that module's output grid
    (both 8-bit: a static convolution's input grid is, lowbit.nn.spec). Returns the activations
    fused, {module: [low, high or None]}, for lowbit.json."""
    fused = {}
    for name, (low, high) in links.activations.items():
        if name in ranges:
            start, end = (float(value) for value in ranges[name]["output"])
            ranges[name]["output"] = (min(max(start, low), high), max(min(end, high), low))
            fused[name] = [low, high if math.isfinite(high) else None]  # None: unbounded (ReLU)
    for consumer, producer in links.producers.items():
        if consumer in ranges and producer in ranges:
            ranges[consumer]["input"] = ranges[producer]["output"]
    return fused


def rounding_readers(ranges: dict[str, dict], sources: dict[str, str], links: Links) -> dict[str, str]:
    """{module: the static convolution on whose input grid its output is to be rounded}
    (lowbit.nn.rounding; the grid is that convolution's once it is built). A second reader of
    one module takes the first's input range, so nothing is rounded twice (`ranges` changes in
    place)."""
    readers: dict[str, str] = {}
    for conv, source in sources.items():
        if conv not in ranges or conv in links.producers:
            continue
        if source in readers:
            ranges[conv]["input"] = ranges[readers[source]]["input"]
            continue
        readers[source] = conv
    return readers


def tensor_sources(model: nn.Module, batch: object, convolutions: list[str]) -> dict[str, str]:
    """{convolution: the module whose output it reads} for each named convolution whose input is
    the output of a module other than a weighted, pass-through or activation one (an EfficientNet
    block's residual sum), found by one call of `model` on `batch`. A module called more than once
    (a shared activation) is no source: one hook would round all its calls."""
    from lowbit.data.batches import call_model

    wanted = set(convolutions)
    made_by: dict[int, str] = {}
    kept: list[torch.Tensor] = []  # alive until the end, so no tensor id is reused
    calls: dict[str, int] = {}
    reads: dict[str, int] = {}

    def after(name: str):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                kept.append(output)
                made_by.setdefault(id(output), name)
        return hook

    def before(name: str):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                kept.append(args[0])
                reads.setdefault(name, id(args[0]))
        return hook

    skipped = (*WEIGHTED, *PASS_THROUGH, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh)
    handles = [module.register_forward_hook(after(name)) for name, module in model.named_modules()
               if name and not isinstance(module, skipped)]
    handles += [module.register_forward_pre_hook(before(name)) for name, module in model.named_modules()
                if name in wanted]
    try:
        with torch.inference_mode():
            call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    sources = {conv: made_by.get(tensor) for conv, tensor in reads.items()}
    return {conv: source for conv, source in sources.items() if source is not None and calls[source] == 1}

"""Linear kernels: the fastest integer kernel PyTorch ships for each scheme, chosen by measurement.

Each kernel takes a quantized module and a 2-D float input [rows, in_features] and returns
[rows, out_features] in float32. `reference` (dequantize, then a float matmul, with the same
activation rounding as the integer kernels) is the ground truth every fast path is tested against.
The choice is made per module and row bucket when the module is built, recorded in its LayerSpec
and saved, so `lowbit inspect` can say which kernel ran and reloads run the same one.

Without AVX512-VNNI, x86 int8 kernels sum pairs of uint8 × int8 products in int16 and saturate
(`vpmaddubsw`); activations are therefore quantized to 7 bits (0..127) — fbgemm's reduce_range —
unless the spec's activation is "uint8-full" (a dynamic Linear quantized on a CPU with VNNI, whose
dot products sum in int32): then 8 bits, and where a file made so is loaded on a CPU without VNNI,
the reference kernel runs instead of fbgemm (`use_available_kernels`).
"""

from __future__ import annotations

import os
import statistics
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from lowbit.core.cpu import has_vnni
from lowbit.core.timing import repeat_seconds, timed
from lowbit.nn.spec import LayerSpec

ROW_BUCKETS = (1, 8, 32, 128, 1024)  # inputs are timed at these row counts; larger ones use the last
# A Linear with more outputs is timed on its first TIMED_OUTPUTS: a 49k-output LM head at 1,024
# rows allocated 200 MB per call and 630 MB in all while being timed (SmolLM2); per output, a
# kernel's time on 8,192 outputs is the same work as on all of them
TIMED_OUTPUTS = 8192
ACTIVATION_QMAX = 127  # reduce_range: 7-bit activations keep int16 pair sums from saturating

PREFERENCE_MARGIN = 0.05
TINY = torch.finfo(torch.float32).tiny

KernelFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


@contextmanager
def _quantized_tensor_api() -> Iterator[None]:
    """torch's quantized-tensor constructors warn that they are deprecated; fbgemm still needs them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*deprecated")
        yield


def normalize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map each row onto [0, 1]: x = low + span * normalized. Per-row (per-token) asymmetric range."""
    low = x.amin(dim=1, keepdim=True)
    span = x.amax(dim=1, keepdim=True).sub_(low).clamp_(min=TINY)
    return (x - low).div_(span), low, span


def fake_quantize(x: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """Round `x` onto an unsigned grid [0, qmax] and back, in float."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, qmax)
    return (q - zero_point) * scale


def static_fake_quantize(module: torch.nn.Module, x: torch.Tensor, side: str) -> torch.Tensor:
    """Round a static module's "input" (7-bit grid; 8-bit for a "uint8-full" convolution) or
    "output" (8-bit grid; none for a float output) as its kernel does."""
    if side == "output" and module.spec.output == "float":
        return x
    qmax = module.spec.input_qmax if side == "input" else 255
    return fake_quantize(x, float(getattr(module, f"{side}_scale")),
                         int(getattr(module, f"{side}_zero_point")), qmax)


def quantize_static_input(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x as a quint8 tensor on a static module's calibrated 7-bit input grid (clamped first, so
    values outside the calibrated range cannot reach the saturating top half of uint8)."""
    with _quantized_tensor_api():
        return torch.quantize_per_tensor(clamped_static_input(module, x).contiguous(),
                                         float(module.input_scale), int(module.input_zero_point),
                                         torch.quint8)


def clamped_static_input(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x clamped to a static module's calibrated 7-bit input grid."""
    scale, zero_point = float(module.input_scale), int(module.input_zero_point)
    low = -zero_point * scale
    return torch.clamp(x, low, low + ACTIVATION_QMAX * scale)


def reference(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dequantize-then-matmul with the scheme's activation rounding: slow, simple, the ground truth."""
    scheme = module.spec.scheme
    if scheme == "dynamic":
        normalized, low, span = normalize_rows(x)
        qmax = module.spec.input_qmax
        x = low + span * fake_quantize(normalized, 1.0 / qmax, 0, qmax)
    elif scheme == "static":
        x = static_fake_quantize(module, x, "input")
    y = F.linear(x, module.dequantized_weight(x.dtype), module.bias)
    return static_fake_quantize(module, y, "output") if scheme == "static" else y


def cached(module: torch.nn.Module, key: str, build: Callable[[], object]) -> object:
    """`module.kernel_cache[key]`, built on first use.

    Built outside inference mode, so that packed weights made while serving under
    torch.inference_mode stay usable when the model is later called with autograd enabled.
    """
    value = module.kernel_cache.get(key)
    if value is None:
        with torch.inference_mode(False), torch.no_grad():
            value = module.kernel_cache[key] = build()
    return value


def _prepack_fbgemm(module: torch.nn.Module, with_bias: bool):
    with _quantized_tensor_api():
        scale = module.weight_scale.double()
        if scale.dim() == 0:
            qweight = torch._make_per_tensor_quantized_tensor(module.weight, float(scale), 0)
        else:
            zeros = torch.zeros(scale.numel(), dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(module.weight, scale, zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, module.bias if with_bias else None)


def _fbgemm_packed(module: torch.nn.Module, with_bias: bool = True):
    key = "fbgemm" if with_bias else "fbgemm_no_bias"
    return cached(module, key, lambda: _prepack_fbgemm(module, with_bias))


def _scripted(function: Callable) -> Callable:
    """TorchScript `function` to run its small ops without Python dispatch between them.

    torch.jit.script is deprecated but still the cheapest way to fuse the dispatch of a few ops
    on CPU; if it is missing or refuses, the plain function gives the same results, only slower.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(function)
    except Exception:  # noqa: BLE001
        return function


def _per_row_linear_dynamic_eager(
    x: torch.Tensor,
    packed: torch.classes.quantized.LinearPackedParamsBase,
    row_sums: torch.Tensor,
    bias: torch.Tensor | None,
    reduce_range: bool = True,
) -> torch.Tensor:
    # Scripted: from Python, each of these small ops costs more in dispatch than in arithmetic.
    low = x.amin(dim=1, keepdim=True)
    span = x.amax(dim=1, keepdim=True).sub_(low).clamp_(min=1.1754943508222875e-38)
    y = torch.ops.quantized.linear_dynamic((x - low).div_(span), packed, reduce_range)
    offset = torch.mm(low, row_sums) if bias is None else torch.addmm(bias, low, row_sums)
    return torch.addcmul(offset, y, span)


_per_row_linear_dynamic = _scripted(_per_row_linear_dynamic_eager)


def fbgemm_dynamic(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fbgemm `quantized::linear_dynamic` (W8A8) with per-row activation ranges.

    fbgemm quantizes activations with one range per call; normalizing each row to [0, 1] first and
    undoing it on the output (W·x = span·W·normalized + low·W·1) gives every token its own range.
    """
    packed, row_sums = _per_row_operands(module)
    return _per_row_linear_dynamic(x, packed, row_sums, module.bias, _reduce_range(module))


def _reduce_range(module: torch.nn.Module) -> bool:
    """fbgemm's 7-bit activations, unless the spec's input grid is the full 8 bits."""
    return module.spec.input_qmax == ACTIVATION_QMAX


def _per_row_operands(module: torch.nn.Module):
    """fbgemm's packed weight (no bias) and the dequantized weight's row sums, as a [1, N] row."""
    row_sums = cached(module, "weight_row_sums",
                      lambda: module.dequantized_weight().sum(dim=1, keepdim=True).T.contiguous())
    return _fbgemm_packed(module, False), row_sums


def dequantized_fp32(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dequantize the weight per call and run the float GEMM: wins over int8 GEMMs at many rows.

    Activations stay in float, so it is at least as accurate as the scheme's integer path.
    """
    return F.linear(x, module.dequantized_weight(x.dtype), module.bias)


def fbgemm_static(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fbgemm `quantized::linear`: int8 weights, activations quantized with calibrated scales; a
    float output is the int32 sums times the scales, plus the bias."""
    if module.spec.output == "float":
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            clamped_static_input(module, x).contiguous(), float(module.input_scale),
            int(module.input_zero_point), _fbgemm_packed(module))
    qx = quantize_static_input(module, x)
    qy = torch.ops.quantized.linear(
        qx, _fbgemm_packed(module), float(module.output_scale), int(module.output_zero_point)
    )
    return qy.dequantize()


def aligned(tensor: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """`tensor`, copied when its data does not start on an `alignment`-byte boundary.

    A tensor read from a safetensors file can start anywhere in the file; the AVX-512 path of
    `_weight_int8pack_mm` crashed the process (SIGSEGV) on such a weight.
    """
    if tensor.data_ptr() % alignment == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def int8pack_bf16(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`torch._weight_int8pack_mm` with bf16 activations: fast for a few rows, int8 weight-only."""
    scales = cached(module, "int8pack_scales", lambda: module.weight_scale.to(torch.bfloat16))
    weight = cached(module, "int8pack_weight", lambda: aligned(module.weight.contiguous()))
    y = torch._weight_int8pack_mm(x.to(torch.bfloat16), weight, scales).float()
    return y if module.bias is None else y + module.bias


def _prepack_int4(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    quantized = module.quantized_weight()
    packed = torch._convert_weight_to_int4pack_for_cpu(quantized.data.to(torch.int32), 2)
    scale = quantized.scale
    if quantized.minimum is not None:  # q * scale + minimum
        zero = quantized.minimum + 8.0 * scale  # the kernel computes (q - 8) * scale + zero
    else:
        zero_point = quantized.zero_point.float() if quantized.zero_point is not None else 8.0
        zero = (8.0 - zero_point) * scale
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros.to(torch.bfloat16)


def int4pack_bf16(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`torch._weight_int4pack_mm_for_cpu` with bf16 activations: int4 weight-only, few rows."""
    packed, scales_and_zeros = cached(module, "int4pack", lambda: _prepack_int4(module))
    group_size = module.weight_shape[-1] // module.weight_scale.shape[-1]
    y = torch._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16), packed, group_size, scales_and_zeros
    ).float()
    return y if module.bias is None else y + module.bias


KERNELS: dict[str, KernelFn] = {
    "reference": reference,
    "dequantized_fp32": dequantized_fp32,
    "fbgemm_dynamic": fbgemm_dynamic,
    "fbgemm_static": fbgemm_static,
    "int8pack_bf16": int8pack_bf16,
    "int4pack_bf16": int4pack_bf16,
}


# Every kernel name a LayerSpec may record: the Linear kernels above, QEmbedding's and QConv2d's.
KERNEL_NAMES = (*KERNELS, "row_gather", "fbgemm_conv2d")


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def missing_kernel(spec: LayerSpec) -> str | None:
    """Why this machine cannot run `spec`'s integer kernel (it would run the slow reference), or
    None when it can."""
    if spec.scheme in ("dynamic", "static") and not fbgemm_available():
        return (f"the {spec.scheme} W8A8 scheme needs PyTorch's fbgemm engine, which this build lacks "
                f"(engines: {', '.join(torch.backends.quantized.supported_engines) or 'none'})")
    return None


def candidate_kernels(module: torch.nn.Module, this_machine: bool = True) -> list[str]:
    """Kernels whose numerics fit this module's spec: the reference first, then the scheme's own
    fast kernel (preferred when timings are close), then alternatives. `this_machine=False` also
    lists kernels this PyTorch build lacks (what a file made elsewhere may name)."""
    spec = module.spec
    candidates = ["reference"]
    fbgemm_ready = fbgemm_available() or not this_machine
    if spec.activation == "uint8-full" and spec.scheme == "dynamic" and this_machine:
        fbgemm_ready = fbgemm_ready and has_vnni()  # 8-bit activations saturate without VNNI
    if spec.scheme in ("dynamic", "static") and fbgemm_ready:
        candidates.append(f"fbgemm_{spec.scheme}")
    if spec.scheme == "dynamic":
        candidates.append("dequantized_fp32")
    weight_only = spec.scheme == "weight_only"
    out_features, in_features = module.weight_shape
    # torch's `_weight_int8pack_mm` segfaults when the input width is not a multiple of 16 (measured
    # on an AVX-512/AMX Xeon, torch 2.13: widths 8, 24, 40, 56, 72, 100 crash; 32, 48, 80, 112 run)
    int8pack_fits = in_features % 16 == 0
    if weight_only and spec.weight == "int8" and spec.granularity == "per_channel" and spec.symmetric \
            and int8pack_fits:
        candidates.append("int8pack_bf16")
    if weight_only and spec.weight == "int4" and out_features % 16 == 0 and in_features % 32 == 0:
        candidates.append("int4pack_bf16")
    return candidates


def _pick(timings: dict[str, float], preferred: str | None) -> str:
    """The fastest kernel, except that the scheme's own integer kernel is kept unless another is
    clearly faster (by PREFERENCE_MARGIN): a timing within noise should not flip the numerics."""
    fastest = min(timings, key=timings.get)
    if preferred and timings[preferred] <= timings[fastest] * (1 + PREFERENCE_MARGIN):
        return preferred
    return fastest


def _time_kernel(kernel: KernelFn, module: torch.nn.Module, x: torch.Tensor) -> float:
    """Median seconds per call over about 20 ms of calls (at least 7; 3 when one call alone takes
    over 5 ms, e.g. a 49k-row LM head at 1,024 rows), after a warm-up call."""
    kernel(module, x)  # warm-up: builds packed weights
    _, once = timed(lambda: kernel(module, x))
    repeats = max(3 if once > 0.005 else 7, min(200, int(0.02 / max(once, 1e-6))))
    return statistics.median(repeat_seconds(lambda: kernel(module, x), repeats))


_CHOICES: dict[tuple, dict[str, str]] = {}


def choose_kernels(module: torch.nn.Module) -> dict[str, str]:
    """Time each candidate at each of ROW_BUCKETS rows and keep the fastest per bucket (see `_pick`).

    Results are cached per (spec, shape) within a process, so a model with repeated layer shapes
    is measured once per shape. Set LOWBIT_KERNEL=reference to force the reference everywhere.
    """
    forced = os.environ.get("LOWBIT_KERNEL")
    if forced:
        return {str(rows): forced for rows in ROW_BUCKETS}
    spec, in_features = module.spec, module.weight_shape[-1]
    candidates = candidate_kernels(module)
    key = (spec.scheme, spec.weight, spec.granularity, spec.symmetric, module.weight_shape, tuple(candidates))
    if key not in _CHOICES:
        choice = {}
        timed = (module.first_outputs(TIMED_OUTPUTS)
                 if getattr(module, "out_features", 0) > TIMED_OUTPUTS and hasattr(module, "first_outputs")
                 else module)
        with torch.inference_mode():
            for rows in ROW_BUCKETS:
                x = torch.randn(rows, in_features)
                timings = {name: _time_kernel(KERNELS[name], timed, x) for name in candidates}
                choice[str(rows)] = _pick(timings, preferred=candidates[1] if len(candidates) > 1 else None)
        module.kernel_cache.clear()
        timed.kernel_cache.clear()
        _CHOICES[key] = choice
    return dict(_CHOICES[key])


def _bind_fbgemm_dynamic(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    packed, row_sums = _per_row_operands(module)
    return partial(_per_row_linear_dynamic, packed=packed, row_sums=row_sums, bias=module.bias,
                   reduce_range=_reduce_range(module))


# Kernels whose per-call work can be bound once: fewer Python steps on the hot path.
BINDERS: dict[str, Callable[[torch.nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {
    "fbgemm_dynamic": _bind_fbgemm_dynamic,
}


def _bind(module: torch.nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    binder = BINDERS.get(name)
    return binder(module) if binder else partial(KERNELS[name], module)


def _dispatch_table(module: torch.nn.Module) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """A bound kernel per row count 0..ROW_BUCKETS[-1], built once per spec: the hot path is one
    list index and one call."""
    built = module.kernel_cache.get("dispatch")
    if built is not None and built[0] is module.spec:
        return built[1]
    spec = module.spec
    bound = {name: _bind(module, name) for name in set(spec.kernels.values()) | {"reference"}}
    table = [bound[spec.kernel_for(rows)] for rows in range(ROW_BUCKETS[-1] + 1)]
    module.kernel_cache["dispatch"] = (module.spec, table)
    return table


def run_kernel(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dispatch a 2-D input to the kernel recorded for its row bucket (reference off the CPU)."""
    if x.device.type != "cpu":
        return reference(module, x)
    table = _dispatch_table(module)
    try:
        return table[min(x.shape[0], len(table) - 1)](x)
    except RuntimeError:
        # fbgemm refuses inputs holding NaN or inf ("min should be less than or equal to max");
        # the reference propagates them as a float layer would, and raises any other error itself.
        return reference(module, x)

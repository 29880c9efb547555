"""A linear layer that runs W8A8 dynamic int8: int8 weights, activations quantized per token.

The module holds exactly what a compressed-tensors ``int-quantized`` checkpoint stores (int8
``weight`` [out, in], ``weight_scale`` [out, 1], optional ``bias``), so it loads with a plain
``load_state_dict``. Its forward quantizes each token of the input to int8 (``absmax / 127``,
round half to even), multiplies the int8 integers by the int8 weight with int32 accumulation,
and rescales by token scale x channel scale (+ bias). Several kernels compute that product; all
of them multiply the same integers and accumulate exactly, so they agree to float32 rounding of
the final rescale (``tests/plugins/test_dynamic_int8.py`` checks it):

* ``fbgemm`` (CPU, x86): PyTorch's fbgemm u8 x s8 -> s32 GEMM on a prepacked weight. On CPUs
  without AVX-512 VNNI (AVX2 only, like the benchmark machine) fbgemm multiplies with
  ``vpmaddubsw``, which adds two u8 x s8 products in a *saturating* int16: full-range 8-bit
  activations (stored as q + 128 in [1, 255]) overflow it, and 0.8% of the outputs of a layer
  with an outlier channel came out wrong by thousands of units. PyTorch's own dynamic
  quantization avoids this by using 7-bit activations (``reduce_range``), which is not int8.
  Here each token's integers are split exactly as ``q = 2 * h + l`` with ``h = trunc(q / 2)`` in
  [-63, 63] and ``l`` in {-1, 0, 1}; both halves fit 7 bits (u8 values <= 127, so no pair of
  products can saturate), go through the GEMM as 2 * tokens rows in one call (the weight is
  streamed once), and are recombined as ``2 * acc_h + acc_l``: exactly the int8 product.
  For a decode step (1 token) the second row costs ~5%; for long inputs it doubles the
  arithmetic, so from ``FBGEMM_MAX_TOKENS`` tokens per call on the same integers go through
  the float GEMM instead (faster there; neither beats fp32 on long prompts, see the bench).
* ``int_mm`` (CUDA): ``torch._int_mm`` (int8 x int8 -> int32), rows padded to its minimum.
* ``reference`` (anywhere): the integers as float32 through ``F.linear``; exact while partial
  sums stay below 2**24, i.e. for any realistic layer. Used where no int8 kernel exists.

``backend="auto"`` (the default) picks ``fbgemm`` on CPUs where PyTorch has it, ``int_mm`` on
CUDA when the shapes allow it, else ``reference``. Prepacked kernels live beside the buffers
(never in the state dict) and are rebuilt when the weight, its device or the backend changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from quantmill.plugins.base import QuantizedWeight
from quantmill.plugins.quantizers.dynamic_int8.algorithm import (
    ZERO_POINT,
    quantize_per_token,
)

BACKENDS = ("auto", "fbgemm", "int_mm", "reference")
#: from this many tokens in one call on, the ``fbgemm`` backend multiplies the same integers
#: with the float GEMM instead: the 7-bit split doubles fbgemm's arithmetic, and past ~64 rows
#: (measured on the benchmark machine: 576x576 to 1536x576 layers) the float GEMM is faster
FBGEMM_MAX_TOKENS = 64
#: zero point of the 7-bit halves fed to fbgemm: u8 = h + 64 is in [1, 127]
_HALF_ZERO_POINT = 64

Kernel = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def fbgemm_available() -> bool:
    """Whether PyTorch's fbgemm int8 linear ops can run here (x86 CPU builds)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    if torch.backends.quantized.engine not in ("fbgemm", "x86"):
        return False
    try:
        torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32  # noqa: B018
        torch.ops.quantized.linear_prepack  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def int_mm_fits(in_features: int, out_features: int) -> bool:
    """``torch._int_mm`` on CUDA needs both matrix widths to be multiples of 8."""
    return in_features % 8 == 0 and out_features % 8 == 0 and hasattr(torch, "_int_mm")


def resolve_backend(requested: str, device: torch.device, in_features: int,
                    out_features: int) -> str:
    """The kernel a module with these widths uses on ``device`` for backend ``requested``."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown Int8DynamicLinear backend {requested!r} "
                         f"(expected one of {', '.join(BACKENDS)})")
    if requested != "auto":
        return requested
    if device.type == "cpu" and fbgemm_available():
        return "fbgemm"
    if device.type == "cuda" and int_mm_fits(in_features, out_features):
        return "int_mm"
    return "reference"


# --------------------------------------------------------------------------------------------
# Kernels: x [..., in] (+ bias) -> W8A8 output [..., out] in x's dtype
# --------------------------------------------------------------------------------------------


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """float32 [tokens, in], contiguous, without autograd history (inference only)."""
    flat = x.detach().reshape(-1, x.shape[-1])
    return flat if flat.dtype == torch.float32 and flat.is_contiguous() else (
        flat.to(torch.float32).contiguous())


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        y = y.add_(bias)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if y.dtype == x.dtype else y.to(x.dtype)


def reference_kernel(weight: torch.Tensor, weight_scale: torch.Tensor) -> Kernel:
    """Integers as float32 through an ordinary float GEMM (portable, slow: it widens the weight
    on every call)."""
    scale = weight_scale.to(torch.float32).reshape(1, -1)

    def run(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q, x_scale = quantize_per_token(_flatten(x))
        y = F.linear(q, weight.to(torch.float32)).mul_(x_scale).mul_(scale)
        return _finish(y, x, bias)

    return run


def int_mm_kernel(weight: torch.Tensor, weight_scale: torch.Tensor) -> Kernel:
    """``torch._int_mm`` (CUDA int8 GEMM); it needs more than 16 rows, a multiple of 8."""
    weight_t = weight.t()  # [in, out], column-major view: the layout _int_mm wants for mat2
    scale = weight_scale.to(torch.float32).reshape(1, -1)

    def run(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q, x_scale = quantize_per_token(_flatten(x))
        tokens = q.shape[0]
        rows = max(24, -(-tokens // 8) * 8)
        q = q.to(torch.int8)
        if rows != tokens:
            q = F.pad(q, (0, 0, 0, rows - tokens))
        acc = torch._int_mm(q, weight_t)[:tokens]  # int32 [tokens, out]
        return _finish(acc.to(torch.float32).mul_(x_scale).mul_(scale), x, bias)

    return run


def fbgemm_w8a8(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase,
                bias: torch.Tensor | None) -> torch.Tensor:
    """The fbgemm path end to end: per-token int8, exact 7-bit split, one GEMM, rescale.

    Kept TorchScript-compatible: scripted, its dozen small ops cost about a third of what they
    cost dispatched one by one from Python, which matters at decode time, where they take as
    long as the GEMM itself. Same float expressions as ``quantize_per_token``.
    """
    flat = x.detach().reshape(-1, x.shape[-1])
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    flat = flat.contiguous()
    tokens = flat.shape[0]
    amax = flat.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30)  # AMAX_FLOOR
    q = torch.div(flat, amax).mul_(127.0).round_()  # integers in [-127, 127]
    h = torch.div(q, 2.0, rounding_mode="trunc")  # in [-63, 63]
    halves = torch.cat((h, q.sub_(h, alpha=2)))  # [h; l], l = q - 2h in {-1, 0, 1}
    # the op quantizes round(X / 1.0) + 64 (exact for these integers: u8 in [1, 127]) and
    # returns acc * 1.0 * weight_scale in float32
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        halves, 1.0, 64, packed)  # [2 * tokens, out]
    y = torch.add(y[tokens:], y[:tokens], alpha=2).mul_(amax.mul_(1.0 / 127))
    if bias is not None:
        y = y.add_(bias)
    shape = list(x.shape[:-1])
    shape.append(y.shape[1])
    y = y.reshape(shape)
    return y if y.dtype == x.dtype else y.to(x.dtype)


_SCRIPTED: dict[str, Callable[..., torch.Tensor]] = {}


def _scripted_fbgemm() -> Callable[..., torch.Tensor]:
    """``fbgemm_w8a8`` compiled by TorchScript once per process, or as it is if that fails
    (TorchScript is deprecated in PyTorch and may go; the eager function computes the same)."""
    if "fbgemm" not in _SCRIPTED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _SCRIPTED["fbgemm"] = torch.jit.script(fbgemm_w8a8)
        except Exception:  # any scripting failure: the eager function is correct, only slower
            _SCRIPTED["fbgemm"] = fbgemm_w8a8
    return _SCRIPTED["fbgemm"]


def fbgemm_kernel(weight: torch.Tensor, weight_scale: torch.Tensor) -> Kernel:
    """fbgemm's u8 x s8 GEMM on the exact 7-bit split of each token (see the module docstring)."""
    out_features = weight.shape[0]
    with warnings.catch_warnings():
        # PyTorch marks quantized tensors deprecated; they are still the only way to reach its
        # int8 CPU GEMM, and ``fbgemm_available`` checks the ops exist before we get here.
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            weight.detach().cpu().contiguous(),
            weight_scale.detach().reshape(-1).to(torch.float64).cpu(),
            torch.zeros(out_features, dtype=torch.int64),
            0,
        )
        packed = torch.ops.quantized.linear_prepack(qweight, None)
    compute = _scripted_fbgemm()
    widened = reference_kernel(weight, weight_scale)
    limit = FBGEMM_MAX_TOKENS * weight.shape[1]

    def run(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.numel() >= limit:  # long prompts: the split doubles fbgemm's work, see above
            return widened(x, bias)
        return compute(x, packed, bias)

    return run


KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor], Kernel]] = {
    "reference": reference_kernel,
    "fbgemm": fbgemm_kernel,
    "int_mm": int_mm_kernel,
}


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place modification counter; 0 for inference tensors, which keep none
    (asked first: raising and catching the error costs ~20 us, on every call)."""
    return 0 if tensor.is_inference() else tensor._version


class Int8DynamicLinear(torch.nn.Module):
    """``y = dequant(int8(x) @ W_int8.T) + b``, activations quantized per token on the fly.

    Inference only: the output carries no gradient.

    Buffers (compressed-tensors ``int-quantized`` names and dtypes): ``weight`` int8
    [out, in]; ``weight_scale`` [out, 1] (fp16 as quantmill writes it; any float is read);
    ``bias`` [out] or None.
    """

    #: the buffers that together stand for the weight (the size evaluator counts their bits)
    QUANTIZED_BUFFERS: tuple[str, ...] = ("weight", "weight_scale")

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown Int8DynamicLinear backend {backend!r} "
                             f"(expected one of {', '.join(BACKENDS)})")
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        # Allocated empty: the values come from a checkpoint (load_state_dict) or from_quantized.
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.empty(out_features, 1, dtype=scale_dtype, device=device)
        )
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype,
                                                     device=device))
        else:
            self.register_buffer("bias", None)
        self._kernel: Kernel | None = None
        self._kernel_key: tuple[Any, ...] | None = None
        #: set by ``int8_siblings.fuse_siblings``: (group, index) when siblings share one GEMM
        self._sibling: tuple[Any, int] | None = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, backend: str = "auto") -> Int8DynamicLinear:
        """The module for one 8-bit symmetric per-channel ``QuantizedWeight`` (zero points 128),
        with the dtypes a checkpoint stores (fp16 scales and bias)."""
        check_w8_per_channel(qw)
        module = cls(qw.in_features, qw.out_features, bias=qw.bias is not None,
                     device=qw.intweight.device, backend=backend)
        module.weight = (qw.intweight.to(torch.int16) - ZERO_POINT).to(torch.int8).contiguous()
        module.weight_scale = qw.scales.reshape(-1, 1).to(torch.float16).contiguous()
        if qw.bias is not None:
            module.bias = qw.bias.detach().to(torch.float16).contiguous()
        return module

    def to_quantized(self) -> QuantizedWeight:
        """The weight in quantmill's unsigned form (intweight = int8 + 128, zero point 128)."""
        return QuantizedWeight(
            intweight=(self.weight.to(torch.int16) + ZERO_POINT).to(torch.uint8),
            scales=self.weight_scale.to(torch.float32).reshape(1, -1),
            zeros=torch.full((1, self.out_features), ZERO_POINT, dtype=torch.int32),
            g_idx=torch.zeros(self.in_features, dtype=torch.int32),
            bits=8,
            group_size=-1,
            sym=True,
            bias=None if self.bias is None else self.bias.to(torch.float32),
        )

    def dequantize_weight(self) -> torch.Tensor:
        """The weight as float32 [out, in] (what a weight-only runtime would use)."""
        return self.weight.to(torch.float32) * self.weight_scale.to(torch.float32)

    def kernel_name(self, device: torch.device | None = None) -> str:
        """The kernel ``forward`` uses for inputs on ``device`` (default: the weight's)."""
        device = self.weight.device if device is None else torch.device(device)
        return resolve_backend(self.backend, device, self.in_features, self.out_features)

    def weight_key(self) -> tuple[int, int, int, int]:
        """Changes whenever the weight or its scales are replaced or modified in place."""
        w, s = self._buffers["weight"], self._buffers["weight_scale"]  # skips __getattr__
        return w.data_ptr(), _version(w), s.data_ptr(), _version(s)

    def _kernel_for(self, device: torch.device) -> Kernel:
        key = (device, self.backend, *self.weight_key())
        if self._kernel is None or self._kernel_key != key:
            name = self.kernel_name(device)
            self._kernel = KERNELS[name](self.weight.to(device), self.weight_scale.to(device))
            self._kernel_key = key
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8DynamicLinear expects {self.in_features} input features, "
                             f"got shape {tuple(x.shape)}")
        if self._sibling is not None and self._sibling[0].enabled:
            group, index = self._sibling
            return group.output(index, x)
        # inference only: the kernels detach x (rounding has no useful gradient)
        return self._kernel_for(x.device)(x, self.bias)

    def __getstate__(self) -> dict[str, Any]:
        # prepacked kernels are caches tied to this process; copies rebuild their own
        state = dict(self.__dict__)
        state["_kernel"], state["_kernel_key"] = None, None
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend}")


def check_w8_per_channel(qw: QuantizedWeight) -> None:
    """Raise ValueError unless ``qw`` is 8-bit symmetric, one group per output channel, zero
    points 128: the only weights W8A8 int8 stores."""
    problems = []
    if qw.bits != 8:
        problems.append(f"{qw.bits}-bit")
    if not qw.sym:
        problems.append("asymmetric")
    if qw.scales.shape[0] != 1 or qw.group_size not in (-1, qw.in_features):
        problems.append(f"group size {qw.group_size}")
    elif bool((qw.zeros != ZERO_POINT).any()):
        problems.append("zero points other than 128")
    if problems:
        raise ValueError(f"weights are {', '.join(problems)}; int8 W8A8 needs 8-bit symmetric "
                         "weights with one scale per output channel")

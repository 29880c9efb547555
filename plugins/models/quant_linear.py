"""A linear layer that runs straight from the GPTQ checkpoint layout.

Why a module of our own rather than a runtime's kernel: quantmill reloads its own checkpoints to
measure them (perplexity, size) on CPU-only machines where no GPTQ kernel exists, and it must
measure exactly the integers it wrote. So the module keeps only the packed buffers (its memory is
close to the file size) and dequantizes on the fly in float32, which reproduces
``QuantizedWeight.dequantize()`` bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantmill.plugins.base import QuantizedWeight
from quantmill.plugins.base import num_groups as count_groups
from quantmill.plugins.formats.packing import (
    pack_cols,
    pack_rows,
    packed_length,
    unpack_cols,
    unpack_rows,
)
from quantmill.plugins.hadamard import (
    BLOCK_SUFFIX,
    SIGNS_SUFFIX,
    InputRotation,
    split_dimension,
)

#: ``quant_method`` of a GPTQ-layout checkpoint whose linears also rotate their inputs
#: (``plugins/hadamard.py``): a name of its own, so that no runtime that cannot apply the
#: rotation reads it as plain GPTQ and computes with rotated weights on unrotated inputs
#: (transformers skips an unknown method with a warning and reports the quantized weights missing).
ROTATED_GPTQ_METHOD = "quantmill_rotated_gptq"
#: the ``quant_method`` values quantmill reads as GPTQ-layout checkpoints
GPTQ_METHODS: tuple[str, ...] = ("gptq", ROTATED_GPTQ_METHOD)

#: checkpoint_format -> what to add to the stored zeros to get the true zero point. GPTQ v1
#: (AutoGPTQ) stores ``zero - 1``; v2 (GPTQModel) stores the zero itself.
ZERO_OFFSETS: dict[str, int] = {"gptq": 1, "gptq_v2": 0}


def zero_offset_for(checkpoint_format: str) -> int:
    """The zero offset of a checkpoint format, refusing formats we do not know."""
    try:
        return ZERO_OFFSETS[checkpoint_format]
    except KeyError:
        known = ", ".join(sorted(ZERO_OFFSETS))
        raise ValueError(
            f"unknown GPTQ checkpoint_format {checkpoint_format!r} (known: {known})"
        ) from None


class GPTQLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with W held as packed GPTQ integers, scales and zeros.

    Buffers (the names and dtypes a GPTQ checkpoint uses):

    * ``qweight`` int32 [in * bits / 32, out]: the integers packed along the input dimension;
    * ``qzeros`` int32 [groups, out * bits / 32]: stored zeros (``zero - zero_offset``) packed
      along the output dimension;
    * ``scales`` fp16 [groups, out];
    * ``g_idx`` int32 [in]: the group of each input column;
    * ``bias`` fp16 [out] or None;
    * with ``rotated=True`` also ``input_rotation_signs`` int8 [in] and ``input_rotation_block``
      float32 [m, m] (``InputRotation``): the layer computes ``(x @ T) @ W.T``.
    """

    #: the buffers that together stand for the weight (the size evaluator counts their bits)
    QUANTIZED_BUFFERS: tuple[str, ...] = ("qweight", "qzeros", "scales", "g_idx", SIGNS_SUFFIX,
                                          BLOCK_SUFFIX)

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        *,
        bias: bool = False,
        zero_offset: int = 0,
        num_groups: int | None = None,
        rotated: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if zero_offset not in (0, 1):
            raise ValueError(f"zero_offset must be 0 (gptq_v2) or 1 (gptq), got {zero_offset}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.zero_offset = zero_offset
        groups = num_groups if num_groups is not None else count_groups(in_features, group_size)
        rows = packed_length(in_features, bits)
        zero_cols = packed_length(out_features, bits)
        # Allocated empty: the values come from a checkpoint (load_state_dict) or from_quantized.
        self.register_buffer(
            "qweight", torch.empty(rows, out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "qzeros", torch.empty(groups, zero_cols, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "scales", torch.empty(groups, out_features, dtype=torch.float16, device=device)
        )
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        if bias:
            self.register_buffer(
                "bias", torch.empty(out_features, dtype=torch.float16, device=device)
            )
        else:
            self.register_buffer("bias", None)
        self.rotated = rotated
        if rotated:
            m, _ = split_dimension(in_features)
            self.register_buffer(
                SIGNS_SUFFIX, torch.empty(in_features, dtype=torch.int8, device=device))
            self.register_buffer(
                BLOCK_SUFFIX, torch.empty(m, m, dtype=torch.float32, device=device))

    @property
    def checkpoint_format(self) -> str:
        return "gptq" if self.zero_offset == 1 else "gptq_v2"

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, checkpoint_format: str) -> GPTQLinear:
        """Pack one ``QuantizedWeight`` into the layout of ``checkpoint_format``.

        Refuses zeros that the format cannot store: v1 stores ``zero - 1``, so a zero of 0
        (common for asymmetric quantization) would wrap to 2**bits - 1 and be read back as
        2**bits; that is why asymmetric weights are written as gptq_v2.
        """
        offset = zero_offset_for(checkpoint_format)
        zeros = qw.zeros.to(torch.int64)
        maxq = (1 << qw.bits) - 1
        if zeros.numel() and (int(zeros.min()) < offset or int(zeros.max()) > maxq):
            raise ValueError(
                f"zero points in [{int(zeros.min())}, {int(zeros.max())}] cannot be stored in "
                f"checkpoint_format {checkpoint_format!r} at {qw.bits} bits "
                f"(allowed [{offset}, {maxq}]); use gptq_v2"
            )
        module = cls(
            qw.in_features,
            qw.out_features,
            qw.bits,
            qw.group_size,
            bias=qw.bias is not None,
            zero_offset=offset,
            num_groups=int(qw.scales.shape[0]),
            rotated=qw.input_rotation is not None,
            device=qw.intweight.device,
        )
        # intweight [out, in] -> [in, out] -> packed [in * bits / 32, out]
        module.qweight = pack_rows(qw.intweight.to(torch.int64).T, qw.bits)
        # zeros [groups, out] -> packed [groups, out * bits / 32]
        module.qzeros = pack_cols(zeros - offset, qw.bits)
        module.scales = qw.scales.to(torch.float16).contiguous()
        module.g_idx = qw.g_idx.to(torch.int32).contiguous()
        if qw.bias is not None:
            module.bias = qw.bias.detach().to(torch.float16).contiguous()
        if qw.input_rotation is not None:
            for suffix, tensor in qw.input_rotation.to_checkpoint().items():
                setattr(module, suffix, tensor.to(qw.intweight.device))
        return module

    def input_rotation(self) -> InputRotation | None:
        """The rotation this layer applies to its inputs (None when it has none)."""
        if not self.rotated:
            return None
        return InputRotation(getattr(self, SIGNS_SUFFIX).to(torch.float32),
                             getattr(self, BLOCK_SUFFIX))

    def unpacked_zeros(self) -> torch.Tensor:
        """The true zero points, int64 [groups, out] (the stored value plus zero_offset).

        For v1 at 2, 4 and 8 bits the offset is added to each 32-bit word as a whole (e.g.
        ``+0x11111111`` at 4 bits), the exact inverse of GPTQModel's v2 -> v1 conversion, which
        subtracts it word-wise: a stored zero point of 0 then borrows from its neighbour, and a
        per-value ``+1`` would misread both. Without such zeros the two readings agree.
        """
        if self.zero_offset and 32 % self.bits == 0:
            per_word = 32 // self.bits
            ones = sum(1 << (self.bits * k) for k in range(per_word))
            words = (self.qzeros.to(torch.int64) + ones * self.zero_offset) & 0xFFFFFFFF
            words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
            return unpack_cols(words, self.bits, self.out_features).to(torch.int64)
        return unpack_cols(self.qzeros, self.bits, self.out_features).to(torch.int64) + (
            self.zero_offset
        )

    def dequantize_weight(self) -> torch.Tensor:
        """The weight the layer stands for, float32 [out, in] (unrotated; as
        ``QuantizedWeight.dequantize``, with the same float32 operations, so the two agree)."""
        stored = self.dequantize_stored_weight()
        rotation = self.input_rotation()
        return stored if rotation is None else rotation.apply_transpose(stored)

    def dequantize_stored_weight(self) -> torch.Tensor:
        """The stored weight as float32 [out, in]: ``(q - z[g_idx]) * s[g_idx]``, transposed."""
        q = unpack_rows(self.qweight, self.bits, self.in_features)  # [in, out]
        gi = self.g_idx.long()
        zeros = self.unpacked_zeros().to(torch.float32)[gi]  # [in, out]
        scales = self.scales.to(torch.float32)[gi]  # [in, out]
        return ((q.to(torch.float32) - zeros) * scales).T  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotation = self.input_rotation()
        if rotation is not None:
            x = rotation.apply(x)  # small dense factors per token (see plugins/hadamard.py)
        weight = self.dequantize_stored_weight().to(x.dtype)  # transient: never cached
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, "
            f"checkpoint_format={self.checkpoint_format}, bias={self.bias is not None}"
            + (", rotated=True" if self.rotated else "")
        )

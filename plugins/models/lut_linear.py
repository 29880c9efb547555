"""A linear layer that runs straight from the ``quantmill-lut`` checkpoint layout.

Why a module of our own: no common runtime has a kernel for per-row look-up tables, yet
quantmill measures every checkpoint from the files it wrote, so the reader needs something that
runs them. The module keeps only the packed indices and the fp16 codebooks (its memory is close to
the file size) and dequantizes on the fly with a gather, which reproduces
``ClusteredWeight.dequantize()`` bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantmill.plugins.base import ClusteredWeight
from quantmill.plugins.formats.packing import pack_cols, unpack_cols

#: Indices of one row are padded to a multiple of this many values, which always fills whole
#: int32 words at any bit width (32 values x b bits = b words).
INDEX_ALIGN = 32


def padded_in_features(in_features: int) -> int:
    """Input columns as stored: rounded up to a multiple of ``INDEX_ALIGN``."""
    return -(-in_features // INDEX_ALIGN) * INDEX_ALIGN


def num_codebooks(out_features: int, rows_per_codebook: int) -> int:
    return -(-out_features // rows_per_codebook)


class LUTLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``W[i, j] = codebook[i // rows_per_codebook, idx[i, j]]``.

    Buffers (as the checkpoint names them):

    * ``qindices`` int32 [out, padded_in * bits / 32]: each row's indices as a little-endian bit
      stream (``packing.pack_cols``), padded with zeros to a multiple of 32 indices;
    * ``codebook`` fp16 [ceil(out / rows_per_codebook), 2**bits];
    * ``bias`` fp16 [out] or None.
    """

    #: the buffers that together stand for the weight (the size evaluator counts their bits)
    QUANTIZED_BUFFERS: tuple[str, ...] = ("qindices", "codebook")

    qindices: torch.Tensor
    codebook: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        rows_per_codebook: int = 1,
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if rows_per_codebook < 1:
            raise ValueError(f"rows_per_codebook must be at least 1, got {rows_per_codebook}")
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {bits}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.rows_per_codebook = rows_per_codebook
        words = padded_in_features(in_features) * bits // 32
        books = num_codebooks(out_features, rows_per_codebook)
        # Allocated empty: the values come from a checkpoint (load_state_dict) or from_clustered.
        self.register_buffer(
            "qindices", torch.empty(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer(
            "codebook", torch.empty(books, 2**bits, dtype=torch.float16, device=device))
        if bias:
            self.register_buffer(
                "bias", torch.empty(out_features, dtype=torch.float16, device=device))
        else:
            self.register_buffer("bias", None)

    @classmethod
    def from_clustered(cls, cw: ClusteredWeight, rows_per_codebook: int = 1) -> LUTLinear:
        """Pack one ``ClusteredWeight``; refuses codebooks that the sharing or fp16 would alter
        (rows of one run must hold identical codebooks, values must be fp16 values)."""
        r = rows_per_codebook
        k = 2**cw.bits
        if cw.codebook.shape != (cw.out_features, k):
            raise ValueError(f"codebook has shape {tuple(cw.codebook.shape)}, expected "
                             f"({cw.out_features}, {k}) for {cw.bits} bits")
        book = cw.codebook.to(torch.float32)
        shared = book[::r]  # [books, k]
        if not torch.equal(shared.repeat_interleave(r, dim=0)[: cw.out_features], book):
            raise ValueError(f"rows of one run of {r} do not share one codebook")
        if not torch.equal(shared.to(torch.float16).to(torch.float32), shared):
            raise ValueError("codebook values are not fp16 values (round them before assigning)")
        module = cls(cw.in_features, cw.out_features, cw.bits, r, bias=cw.bias is not None,
                     device=cw.indices.device)
        idx = cw.indices.to(torch.int64)
        pad = padded_in_features(cw.in_features) - cw.in_features
        if pad:
            idx = torch.cat([idx, idx.new_zeros(cw.out_features, pad)], dim=1)
        module.qindices = pack_cols(idx, cw.bits)  # [out, padded_in * bits / 32]
        module.codebook = shared.to(torch.float16).contiguous()
        if cw.bias is not None:
            module.bias = cw.bias.detach().to(torch.float16).contiguous()
        return module

    def indices(self) -> torch.Tensor:
        """The unpacked indices, int64 [out, in]."""
        padded = unpack_cols(self.qindices, self.bits, padded_in_features(self.in_features))
        return padded[:, : self.in_features].to(torch.int64)

    def dequantize_weight(self) -> torch.Tensor:
        """The weight as float32 [out, in]: a per-row table look-up."""
        book = self.codebook.to(torch.float32)
        if self.rows_per_codebook > 1:
            book = book.repeat_interleave(self.rows_per_codebook, dim=0)[: self.out_features]
        return book.gather(1, self.indices())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize_weight().to(x.dtype)  # transient: never cached on the module
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, rows_per_codebook={self.rows_per_codebook}, "
                f"bias={self.bias is not None}")

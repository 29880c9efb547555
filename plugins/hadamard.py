"""Randomized Hadamard input rotations (incoherence processing): pure tensor functions.

Why: a linear's weight W and its inputs x can be turned by any orthogonal T without changing
the layer, ``x @ W.T == (x @ T) @ (W @ T).T``. With a random T, the few input channels that
carry large activations (and the large weights that meet them) are spread over all channels:
W @ T has no outlier columns and looks Gaussian, so a low-bit grid wastes fewer levels on
outliers (QuIP#, Tseng et al. 2024; QuaRot, Ashkboos et al. 2024). Measured on SmolLM2-135M with
GPTQ's recommended settings, checkpoint written and read back, side by side on 2 CPU cores
(bench/results/tradeoff-rotated/ and, for the unrotated 3-bit and 3.5-bit points,
bench/results/tradeoff.md): perplexity at 4-bit g128 27.59 -> 26.81, at 3 bits 33.72 -> 31.11,
mixed precision at 3.5 average bits 30.41 -> 28.97.

The transform is ``T = diag(s) @ kron(Q, H)`` for ``n = m * 2^k`` (m odd): random signs ``s``, a
seeded Haar-random orthogonal ``Q`` (m x m; [[1]] when n is a power of two) and the normalised
Sylvester Hadamard matrix ``H`` (2^k x 2^k). A checkpoint stores it in n signs and m^2 floats,
not n^2; applying it costs ``n * (m + sum of the Hadamard factors)`` multiply-adds per vector
(H is applied as a Kronecker product of dense factors of at most 64): for SmolLM2-135M about 10 %
of the linears' multiply-adds (13 % for a 576 x 576 linear, 38 % for the narrow k/v projections,
which the reader rotates separately from q although they share the rotation). The same seed and
site always give the same T, so the allocator's measurements and the quantizer see the same
rotated weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import torch

#: Largest Hadamard factor applied as one matrix product (larger ones are split into factors).
MAX_FACTOR = 64
#: Linears that read one tensor share one rotation (module name suffix -> the site's leader).
SHARED_INPUT_LEADERS: dict[str, str] = {
    "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj",
    "mlp.up_proj": "mlp.gate_proj",
}
#: Checkpoint tensor suffixes of a rotated module (``<module>.<suffix>``).
SIGNS_SUFFIX = "input_rotation_signs"
BLOCK_SUFFIX = "input_rotation_block"


def rotation_site(module_name: str) -> str:
    """The name that keys a module's rotation: q/k/v share q_proj's, gate/up share gate_proj's
    (they read the same tensor, so one rotated Hessian serves them all)."""
    for suffix, leader in SHARED_INPUT_LEADERS.items():
        if module_name.endswith(suffix) and (
            len(module_name) == len(suffix) or module_name[-len(suffix) - 1] == "."
        ):
            return module_name[: -len(suffix)] + leader
    return module_name


def split_dimension(n: int) -> tuple[int, int]:
    """``(m, 2^k)`` with ``n = m * 2^k`` and m odd."""
    if n < 1:
        raise ValueError(f"a rotation needs a positive dimension, got {n}")
    power = n & -n
    return n // power, power


@lru_cache(maxsize=16)
def sylvester_hadamard(p: int) -> torch.Tensor:
    """The p x p Sylvester Hadamard matrix scaled to be orthogonal (p a power of two)."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / p**0.5).to(torch.float32)


def hadamard_factors(p: int) -> list[int]:
    """Powers of two of at most ``MAX_FACTOR`` whose product is p (Sylvester's H_p is the
    Kronecker product of the H of its factors)."""
    factors = []
    while p > MAX_FACTOR:
        factors.append(MAX_FACTOR)
        p //= MAX_FACTOR
    if p > 1 or not factors:
        factors.append(p)
    return factors


def _seeded_generator(seed: int, site: str, n: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{site}/{n}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def random_orthogonal(m: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal m x m matrix (QR of a Gaussian with the signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


def _usable(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` on ``like``'s device and dtype, and usable by autograd: a rotation (or the cached
    Hadamard matrix) made under ``torch.inference_mode`` (GPTQ's pass) is an inference tensor,
    which a later autograd pass (block tuning) may not save for backward, so it is copied."""
    t = t.to(like.device, like.dtype)
    if t.is_inference() and not torch.is_inference_mode_enabled():
        t = t.clone()
    return t


def _apply_kron(x: torch.Tensor, matrices: list[torch.Tensor]) -> torch.Tensor:
    """``x @ kron(*matrices)`` over the last dimension of x, one factor at a time."""
    lead = x.shape[:-1]
    sizes = [int(mat.shape[0]) for mat in matrices]
    y = x.reshape(*lead, *sizes)
    for axis, mat in enumerate(matrices):
        dim = len(lead) + axis
        y = torch.movedim(torch.movedim(y, dim, -1) @ mat, -1, dim)
    return y.reshape(*lead, -1)


@dataclass(frozen=True)
class InputRotation:
    """``T = diag(signs) @ kron(block, H)``: the rotation of one linear's inputs.

    ``signs`` float32 [n] of +-1; ``block`` float32 [m, m] orthogonal, m the odd part of n.
    """

    signs: torch.Tensor
    block: torch.Tensor

    @classmethod
    def for_site(cls, n: int, seed: int, site: str) -> InputRotation:
        """The rotation of dimension n for ``site`` (``rotation_site``) under ``seed``."""
        m, _ = split_dimension(n)
        generator = _seeded_generator(seed, site, n)
        signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float32) * 2 - 1
        return cls(signs, random_orthogonal(m, generator))

    @classmethod
    def from_tensors(cls, signs: torch.Tensor, block: torch.Tensor) -> InputRotation:
        """Rebuild from checkpoint tensors, refusing ones that are not a rotation."""
        signs = signs.detach().to(torch.float32).reshape(-1)
        block = block.detach().to(torch.float32)
        m, _ = split_dimension(signs.numel())
        if tuple(block.shape) != (m, m):
            raise ValueError(f"a rotation of {signs.numel()} inputs needs a {m} x {m} block, "
                             f"got {tuple(block.shape)}")
        if not bool(((signs == 1) | (signs == -1)).all()):
            raise ValueError("rotation signs must all be +1 or -1")
        eye = torch.eye(m, dtype=torch.float64, device=block.device)
        if not torch.allclose(block.double() @ block.double().T, eye, atol=1e-4):
            raise ValueError("the rotation block is not orthogonal")
        return cls(signs, block)

    @property
    def n(self) -> int:
        return int(self.signs.numel())

    def _matrices(self, like: torch.Tensor, transpose: bool) -> list[torch.Tensor]:
        block = self.block.T if transpose else self.block
        _, power = split_dimension(self.n)
        mats = [block] + [sylvester_hadamard(p) for p in hadamard_factors(power)]
        return [_usable(mat, like) for mat in mats if mat.shape[0] > 1]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ T`` over the last dimension (rotated inputs; ``W @ T`` for a weight's rows)."""
        x = x * _usable(self.signs, x)
        mats = self._matrices(x, transpose=False)
        return _apply_kron(x, mats) if mats else x

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ T.T``: undoes ``apply`` (a rotated weight's rows back to the original basis)."""
        mats = self._matrices(x, transpose=True)
        y = _apply_kron(x, mats) if mats else x
        return y * _usable(self.signs, y)

    def rotate_hessian(self, hessian: torch.Tensor) -> torch.Tensor:
        """``T.T @ H @ T``: the input second moments of the rotated inputs."""
        half = self.apply(hessian)  # H @ T
        return self.apply(half.T.contiguous()).T.contiguous()  # (T.T @ H @ T).T, symmetric

    def matrix(self) -> torch.Tensor:
        """T as a dense float32 [n, n] matrix (for checks; never stored)."""
        return self.apply(torch.eye(self.n))

    def to_checkpoint(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores: int8 signs and the float32 block (copies: linears
        that share a rotation each store their own, as safetensors wants)."""
        return {SIGNS_SUFFIX: self.signs.to(torch.int8).clone(),
                BLOCK_SUFFIX: self.block.to(torch.float32).clone()}

    def stored_bits(self) -> int:
        """Bits of ``to_checkpoint``'s tensors (the size evaluator counts them)."""
        return 8 * self.n + 32 * int(self.block.numel())

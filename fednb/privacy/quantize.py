"""Updates to integers and back: clipping, stochastic rounding, and a modular sum that cannot wrap.

Secure aggregation sums integers modulo 2^bits (Bonawitz et al., CCS 2017); a float update
must become an integer vector first, and the range must be chosen so that the sum of every
party's vector never wraps around the modulus, or the de-quantized mean would be garbage with
no error to say so.

**The range.** A party clips its update x to L2 norm ``clip`` (a documented clip, never a
tighter one: each coordinate then lies in [-clip, clip]) and weighs it by its example count
e, capped at ``max_examples`` (E). It quantizes the vector ``e·x`` (each coordinate within
±E·clip) and appends e itself, exactly, as one more coordinate, so that weighted FedAvg needs
one masked vector per party: the coordinator divides the two sums.

With n parties and modulus 2^bits, the signed sum must stay within R = 2^(bits-1) - 1, so each
party gets L = ⌊R / n⌋ levels on either side of zero (at most 2^40, so that float64, which
does the scaling and rounding, keeps a resolution far below one level), and the scale is
s = (L - 2) / (E·clip); the 2 levels of slack absorb rounding up and float error. A configuration where L < 3 or n·E > R is refused with a clear
error at round start; nothing is ever clipped to make a sum fit.

**Stochastic rounding** maps a to ⌊a + U⌋ with U uniform on [0, 1) (draws from a
:class:`~fednb.privacy.noise.SecureUniform` stream at a party, a grid of
2^-32: unbiased to within 2^-32 of a level), and within one level of a (plus float64 rounding,
below 2^-10 of a level). Summed over n parties and divided by
the total example count W, each coordinate of the mean is therefore within 1.001·n / (s·W) of
the exact weighted mean of the clipped updates (:meth:`Quantizer.error_bound`); the typical
error is about √n / (2·s·W).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fednb.privacy.noise import SecureUniform

log = logging.getLogger(__name__)

#: Levels beyond this buy no precision from float64 updates and would coarsen the rounding noise.
MAX_LEVELS = 2**40
#: Values quantized per slice: 256 KiB of float64 work that a core's L2 cache holds.
_SLICE = 1 << 15
#: Squares per float32 block of :func:`_squares_bound`.
_BLOCK = 1024


def _squares(flat: np.ndarray, work: np.ndarray) -> float:
    """Σ x_i² accumulated in float64 whatever the dtype, slice by slice through ``work`` (so that the
    clipped norm is the norm asked for, and no float64 copy of the whole update is made); einsum,
    not dot: a BLAS call spins up threads that cost more than this one pass."""
    if flat.dtype == np.float64:
        return float(np.einsum("i,i->", flat, flat))
    total = 0.0
    for start in range(0, flat.size, _SLICE):
        part = work[:min(_SLICE, flat.size - start)]
        np.copyto(part, flat[start:start + _SLICE])
        total += float(np.einsum("i,i->", part, part))
    return total


def _squares_bound(flat: np.ndarray) -> float:
    """An upper bound of Σ x_i² for a float32 vector, at most 2^-11 above it (or inf), in one quick pass.

    Float32 sums of blocks of 1024 squares, added in float64: whatever the order of a block's
    additions, its float32 sum is within γ_1025 = 1025·2^-24 / (1 - 1025·2^-24) < 6.2·10^-5 of
    the exact sum of its (non-negative) squares (Higham, *Accuracy and Stability of Numerical
    Algorithms*, §3.1), and float64 adds the blocks with an error far below that; a square that
    underflows loses less than 2^-126, even where the CPU flushes subnormals to zero. The bound
    is those errors' worst case, with room to spare; a square or block that overflows float32
    gives inf.
    """
    head = flat.size - flat.size % _BLOCK
    blocks, tail = flat[:head].reshape(-1, _BLOCK), flat[head:]
    total = float(np.einsum("ij,ij->i", blocks, blocks).sum(dtype=np.float64)) + float(np.einsum("i,i->", tail, tail))
    return total * (1.0 + 2.0**-12) + flat.size * 2.0**-125


@dataclass(frozen=True)
class Quantizer:
    """The integer encoding of one round: ``parties`` parties, L2 clip, example cap, modulus 2^bits."""

    clip: float
    max_examples: int
    parties: int
    bits: int
    levels: int = field(init=False)
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a finite positive L2 norm, not {self.clip!r}")
        if not isinstance(self.bits, int) or not 16 <= self.bits <= 62:
            raise ValueError(f"bits must be an integer from 16 to 62, not {self.bits!r}")
        if not isinstance(self.parties, int) or self.parties < 1:
            raise ValueError("a round needs at least one party")
        if not isinstance(self.max_examples, int) or self.max_examples < 1:
            raise ValueError("max_examples must be a positive integer")
        half = 2 ** (self.bits - 1) - 1
        if self.parties * self.max_examples > half:
            raise ValueError(
                f"{self.parties} parties × max_examples {self.max_examples} exceed 2^{self.bits - 1}: "
                f"the sum of example counts would wrap; raise bits or lower max_examples")
        levels = min(half // self.parties, MAX_LEVELS)
        if levels < 3:
            raise ValueError(f"2^{self.bits} cannot hold the sum of {self.parties} parties' updates; raise bits")
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "scale", (levels - 2) / (self.max_examples * float(self.clip)))

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """uint32 up to 32 bits, uint64 beyond: what travels, never wider than needed."""
        return np.uint32 if self.bits <= 32 else np.uint64

    @property
    def modulus_mask(self) -> int:
        return (1 << self.bits) - 1

    def weight(self, examples: int) -> int:
        """The weight a party with ``examples`` examples gets: its count, capped at max_examples."""
        if not isinstance(examples, (int, np.integer)) or isinstance(examples, bool) or examples < 1:
            raise ValueError(f"a party's example count is a positive integer, not {examples!r}")
        if examples > self.max_examples:
            # said aloud at the party (never sent): its weight in the mean is capped, its values are not
            log.warning("%d examples exceed max_examples: this update is weighted as %d", examples, self.max_examples)
        return min(int(examples), self.max_examples)

    def quantize(self, update: np.ndarray, examples: int, rng: np.random.Generator | SecureUniform,
                 clip: float | None = None, masks: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """[q(e·clipped x)…, e] as unsigned integers mod 2^bits (length len(update) + 1).

        ``clip`` lets a party clip tighter than the round's clip (the range stays the round's).
        ``masks`` (:meth:`fednb.privacy.masking.Masks.apply`) masks the vector as it is made, one
        slice after the other while each is still in the cache, the example count last.
        """
        flat = np.asarray(update).reshape(-1)
        if flat.dtype not in (np.float32, np.float64):
            flat = flat.astype(np.float64)
        bound = self.clip if clip is None else min(self.clip, clip)
        weight = self.weight(examples)
        size = min(flat.size, _SLICE)
        work, noise = np.empty(size, dtype=np.float64), np.empty(size, dtype=np.float64)
        # a float32 update clearly inside the clip needs no exact norm: it is not scaled, and an upper
        # bound of its norm serves the range check below as well (far the most common case)
        upper = _squares_bound(flat) if flat.dtype == np.float32 else math.inf
        norm = math.sqrt(upper) if upper <= bound * bound else math.sqrt(_squares(flat, work))
        if not math.isfinite(norm):
            raise ValueError("the update holds NaN or infinite values (or values too large to square)")
        factor = np.float64(self.scale * weight * (bound / norm if norm > bound else 1.0))
        # every |x_i| ≤ ‖x‖, so |factor·x_i| ≤ factor·‖x‖ = s·e·min(‖x‖, bound) ≤ s·E·clip = L - 2:
        # checked once, as a number, rather than by scanning the vector for its extremes
        if factor * norm > self.levels - 1.5:
            raise AssertionError("a quantized value would leave its range: the scale is wrong")
        out = np.empty(flat.size + 1, dtype=self.dtype)
        # |⌊a + U⌋| ≤ L fits the signed type of the same width, and two's complement *is* the value
        # mod 2^32 (or 2^64): writing through a signed view wraps negatives without a shift by L
        signed = out.view(np.int32 if self.dtype == np.uint32 else np.int64)
        # slice by slice, so that the float64 work stays in the cache and the update is read once
        for start in range(0, flat.size, _SLICE):
            part = flat[start:start + _SLICE]
            scaled, uniform = work[:part.size], noise[:part.size]
            np.multiply(part, factor, out=scaled)
            rng.random(out=uniform)  # U on a grid of 2^-32 or finer: a bias below 2^-32 of a level
            scaled += uniform
            np.floor(scaled, out=signed[start:start + part.size], casting="unsafe")
            if masks is not None:
                masks(out[start:start + part.size])
        out[-1] = weight
        if masks is not None:
            masks(out[-1:])
        if self.bits not in (32, 64):
            np.bitwise_and(out, self.dtype(self.modulus_mask), out=out)
        return out

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """The weighted mean of the updates and the total example count, from the modular sum."""
        signed, examples = self.lift(total)
        return signed / self.divisor(examples), examples

    def lift(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """The signed sum of the weighted updates (a view where it can be) and the total example count,
        from the modular sum: the mean is the first divided by :meth:`divisor` of the second."""
        total = np.asarray(total)
        if total.dtype != np.dtype(self.dtype) or total.ndim != 1 or total.size < 2:
            raise ValueError(f"a modular sum is a vector of {np.dtype(self.dtype).name}")
        if self.bits == 32:
            signed = total.view(np.int32)  # two's complement is the centred lift
        else:
            # centred lift: values of 2^(bits-1) and above stand for negatives
            signed = total.astype(np.int64) & self.modulus_mask
            signed -= (signed >> (self.bits - 1)) << self.bits
        examples = int(signed[-1])
        if examples < 1:
            raise ValueError("the sum holds no examples: nothing to average")
        return signed[:-1], examples

    def divisor(self, examples: int) -> float:
        """What the signed sum of ``examples`` examples' weighted updates is divided by for their mean."""
        return self.scale * examples

    def error_bound(self, parties: int, examples: int) -> float:
        """Largest error of any coordinate of the mean of ``parties`` updates over ``examples`` examples."""
        return 1.001 * parties / (self.scale * examples)

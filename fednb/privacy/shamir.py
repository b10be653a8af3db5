"""Shamir t-of-n secret sharing over the prime field GF(2^127 - 1).

Shamir, "How to share a secret" (CACM 1979), as secure aggregation uses it (Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017): a party
splits its self-mask seed and its masking key among the parties that hold its shares, so that
any t of them can rebuild a secret of a party that dropped, and fewer than t learn nothing.

A secret of 1 to 255 bytes is cut into 15-byte chunks (each below 2^120, so inside the field);
each chunk is the constant term of its own random polynomial of degree t - 1, with coefficients
from :mod:`secrets`. A share is the values of those polynomials at the holder's x, a nonzero
field element (fednb uses a party's 1-based position in the round's roster). Layout of a share:
one byte giving the secret's length, then 16 bytes big-endian per chunk.

What a holder learns: t - 1 shares of a secret are uniformly distributed whatever the secret
is, so any coalition below the threshold learns nothing about it.

Speed: the field is small enough that Python's integers stay fast (a 32-byte secret is three
chunks), Horner's rule evaluates each polynomial, and the Lagrange coefficients at 0 of a set
of x's are computed once and cached, because the coordinator rebuilds every party's secret
from the same set of holders.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from functools import lru_cache

#: The Mersenne prime 2^127 - 1: a field whose elements fit 16 bytes.
PRIME = 2**127 - 1
#: Bytes of secret per field element; 2^120 < PRIME, so any chunk is a field element.
CHUNK = 15
#: Bytes per field element in a share.
ELEMENT = 16
MAX_SECRET = 255


def share_length(secret_length: int) -> int:
    """Bytes in each share of a secret of ``secret_length`` bytes."""
    return 1 + ELEMENT * -(-secret_length // CHUNK)


def split(secret: bytes, t: int, ids: Iterable[int]) -> dict[int, bytes]:
    """Shares of ``secret`` for the holders ``ids`` (distinct x's in 1..PRIME-1); any ``t`` rebuild it."""
    xs = list(ids)
    if not isinstance(secret, (bytes, bytearray)) or not 1 <= len(secret) <= MAX_SECRET:
        raise ValueError(f"a secret is 1 to {MAX_SECRET} bytes")
    if len(set(xs)) != len(xs) or any(not isinstance(x, int) or not 0 < x < PRIME for x in xs):
        raise ValueError("holder ids must be distinct integers in 1..2^127-2")
    if not isinstance(t, int) or not 1 <= t <= len(xs):
        raise ValueError(f"threshold {t} must be between 1 and the {len(xs)} holders")
    chunks = [int.from_bytes(secret[i:i + CHUNK], "big") for i in range(0, len(secret), CHUNK)]
    polynomials = [[chunk] + [secrets.randbelow(PRIME) for _ in range(t - 1)] for chunk in chunks]
    head = bytes([len(secret)])
    shares: dict[int, bytes] = {}
    for x in xs:
        values = []
        for coefficients in polynomials:
            # Horner's rule with one reduction at the end: x is small, so the unreduced value
            # grows by a few bits per step and Python multiplies it faster than it reduces it
            value = 0
            for coefficient in coefficients[::-1]:
                value = value * x + coefficient
            values.append((value % PRIME).to_bytes(ELEMENT, "big"))
        shares[x] = head + b"".join(values)
    return shares


def combine(shares: Mapping[int, bytes], t: int) -> bytes:
    """The secret rebuilt from at least ``t`` shares (the ``t`` lowest ids are used).

    Raises ValueError for fewer than ``t`` shares, malformed shares, or shares that do not come
    from one secret (detected when a rebuilt chunk falls outside its byte range, which a wrong
    share causes with probability 1 - 2^-7 per chunk; callers that need certainty check the
    secret against a commitment).
    """
    if not isinstance(t, int) or t < 1:
        raise ValueError("the threshold is a positive integer")
    if len(shares) < t:
        raise ValueError(f"{len(shares)} shares cannot rebuild a secret that needs {t}")
    xs = tuple(sorted(shares)[:t])
    if any(not isinstance(x, int) or not 0 < x < PRIME for x in xs):
        raise ValueError("holder ids must be integers in 1..2^127-2")
    first = shares[xs[0]]
    if not isinstance(first, (bytes, bytearray)) or len(first) < 1 + ELEMENT:
        raise ValueError("a share is too short")
    length = first[0]
    size = share_length(length) if length else 0
    if not length or len(first) != size:
        raise ValueError("a share's length does not match the secret length it states")
    count = (size - 1) // ELEMENT
    values: list[list[int]] = []
    for x in xs:
        share = shares[x]
        if not isinstance(share, (bytes, bytearray)) or len(share) != size or share[0] != length:
            raise ValueError(f"the share for holder {x} does not match the others' length")
        row = [int.from_bytes(share[1 + i * ELEMENT:1 + (i + 1) * ELEMENT], "big") for i in range(count)]
        if any(value >= PRIME for value in row):
            raise ValueError(f"the share for holder {x} holds a value outside the field")
        values.append(row)
    weights = _lagrange_at_zero(xs)
    out = bytearray()
    for i in range(count):
        chunk = sum(w * row[i] for w, row in zip(weights, values)) % PRIME
        width = min(CHUNK, length - i * CHUNK)
        if chunk >= 1 << (8 * width):
            raise ValueError("the shares do not come from one secret")
        out += chunk.to_bytes(width, "big")
    return bytes(out)


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange basis polynomials of ``xs`` evaluated at 0: l_j(0) = prod_{m != j} x_m / (x_m - x_j)."""
    weights = []
    for j, xj in enumerate(xs):
        numerator = denominator = 1
        for m, xm in enumerate(xs):
            if m != j:
                numerator = numerator * xm % PRIME
                denominator = denominator * (xm - xj) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(weights)

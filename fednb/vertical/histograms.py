"""SecureBoost's encrypted sums: gradients and hessians packed into one Paillier plaintext, histograms, candidates.

The label party encrypts, for every training row, one plaintext holding its gradient and hessian
(FATE's packing): with F fractional bits relative to the tree's largest |g| and h,

    v = round(g/ĝ · 2^F) · 2^W + round(h/ĥ · 2^F)             W = F + bits(rows) + 2

so that a sum of any rows' v is the pair of sums, as long as each field stays below 2^(W−1) in
magnitude (it does: at most rows · 2^F). A feature party multiplies the ciphertexts of each
bin's rows (the encrypted sum, :meth:`Encrypted.build`), derives a node's sibling by division
(histogram subtraction), takes per feature the running sums over bins (each candidate's left
side), **shuffles** the candidates, and packs ``per`` of them into one ciphertext by Horner's
rule (c ← c^(2^(2W)) · c_next: a shift by 2W bits under encryption), so the label party
decrypts one ciphertext per ``per`` candidates; each packed ciphertext leaves under fresh
randomness of the feature party's own. The label party decodes the fields from the lowest
(balanced digits: the packed value is read as signed mod n, each field as signed).

``Plain`` runs the same flow on floats: the development baseline, which parties refuse unless
their policy allows it. The exponentiations run in a :class:`fednb.privacy.pool.ForkPool` when
one is given; every function handed to it works on bytes.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gmpy2
import numpy as np
from phe.paillier import PaillierPrivateKey, PaillierPublicKey

from fednb.privacy.djn import FixedBase
from fednb.privacy.pool import task
from fednb.vertical.boosting import cumulative, histogram

SERIAL_BELOW = 2048  # ciphertext operations below which the work stays in the calling process


@dataclass(frozen=True)
class Packing:
    """How the label party packs one tree's gradients: F fractional bits, fields of W bits, ``per`` pairs a
    ciphertext, and the scales ĝ, ĥ of the tree (which stay at the label party)."""

    precision: int
    field: int
    per: int

    @classmethod
    def plan(cls, rows: int, key_bits: int, precision: int) -> Packing:
        field = precision + max(rows, 1).bit_length() + 2
        return cls(precision, field, max(1, (key_bits - 2) // (2 * field)))

    def encode(self, g: np.ndarray, h: np.ndarray, scales: tuple[float, float]) -> list[int]:
        """One packed integer per row (signed; the caller reduces mod n)."""
        one = float(1 << self.precision)
        gi = np.rint(g / scales[0] * one).astype(np.int64).tolist()
        hi = np.rint(h / scales[1] * one).astype(np.int64).tolist()
        return [(a << self.field) + b for a, b in zip(gi, hi)]

    def decode(self, plaintexts: Sequence[int], n: int, count: int, scales: tuple[float, float]) -> np.ndarray:
        """The (G, H) sums of ``count`` candidates from their packed plaintexts mod n (candidates × 2)."""
        pair, fieldmask = 2 * self.field, (1 << self.field) - 1
        half, top = 1 << (pair - 1), 1 << pair
        out = np.empty((count, 2))
        i = 0
        for m in plaintexts:
            m = int(m)
            m = m - n if m > n // 2 else m
            for _ in range(min(self.per, count - i)):
                v = m % top
                if v >= half:
                    v -= top
                m = (m - v) >> pair
                hsum = v & fieldmask
                out[i] = ((v - hsum) >> self.field, hsum)
                i += 1
        if i != count:
            raise ValueError(f"{len(plaintexts)} packed ciphertexts hold fewer than {count} candidates")
        return out * (np.array(scales) / float(1 << self.precision))


def scales(g: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """The tree's largest |g| and h (1 where all are 0): what the packed fixed point is relative to."""
    return float(np.max(np.abs(g), initial=0.0)) or 1.0, float(np.max(h, initial=0.0)) or 1.0


# -- pool tasks (bytes in, bytes out) -----------------------------------------------------------------

def _width(n: int) -> int:
    return ((n * n).bit_length() + 7) // 8


def _ints(data: bytes, width: int) -> list[Any]:
    return [gmpy2.mpz(int.from_bytes(data[i:i + width], "big")) for i in range(0, len(data), width)]


def _bytes(values: Sequence[Any], width: int) -> bytes:
    return b"".join(int(v).to_bytes(width, "big") for v in values)


_BASES: dict[int, FixedBase] = {}


def _fixed_base(n: int) -> FixedBase:
    """This process's own obfuscator base for key n (each pool worker draws its own)."""
    base = _BASES.get(n)
    if base is None:
        _BASES.clear()
        base = _BASES[n] = FixedBase(PaillierPublicKey(n))
    return base


@task
def encrypt_task(n_bytes: bytes, width_n: int, plaintexts: bytes) -> bytes:
    """Enc(m) = (1 + m·n)·r mod n² for plaintexts mod n (``width_n`` bytes each), with this process's obfuscators."""
    n = int.from_bytes(n_bytes, "big")
    n2 = gmpy2.mpz(n) * n
    ms = _ints(plaintexts, width_n)
    masks = _fixed_base(n).draw(len(ms))
    return _bytes([(1 + m * n) * r % n2 for m, r in zip(ms, masks)], _width(n))


@task
def histogram_task(n_bytes: bytes, ciphers: bytes, codes: bytes, sizes: bytes) -> bytes:
    """Per feature, per bin the product of the ciphertexts of its rows (codes: rows × features uint8)."""
    n = int.from_bytes(n_bytes, "big")
    n2, width = gmpy2.mpz(n) * n, _width(n)
    values = _ints(ciphers, width)
    bins = np.frombuffer(sizes, dtype="<i8").tolist()
    matrix = np.frombuffer(codes, dtype=np.uint8).reshape(len(values), len(bins)) if values else \
        np.zeros((0, len(bins)), dtype=np.uint8)
    out = []
    for f, size in enumerate(bins):
        acc = [gmpy2.mpz(1)] * size
        for c, b in zip(values, matrix[:, f].tolist()):
            acc[b] = acc[b] * c % n2
        out += acc
    return _bytes(out, width)


@task
def pack_task(n_bytes: bytes, per: int, shift: int, candidates: bytes) -> bytes:
    """Groups of ``per`` candidates, each packed by Horner's rule (the first lowest) and freshly randomized."""
    n = int.from_bytes(n_bytes, "big")
    n2, width = gmpy2.mpz(n) * n, _width(n)
    values = _ints(candidates, width)
    out = []
    for start in range(0, len(values), per):
        group = values[start:start + per]
        acc = group[-1]
        for c in reversed(group[:-1]):
            acc = gmpy2.powmod(acc, 1 << shift, n2) * c % n2
        out.append(acc)
    masks = _fixed_base(n).draw(len(out))
    return _bytes([a * r % n2 for a, r in zip(out, masks)], width)


@task
def decrypt_task(p_bytes: bytes, q_bytes: bytes, ciphers: bytes) -> bytes:
    """The plaintexts mod n of ciphertexts (for the key holder: its own primes, in its own processes)."""
    p, q = int.from_bytes(p_bytes, "big"), int.from_bytes(q_bytes, "big")
    public = PaillierPublicKey(p * q)
    private = PaillierPrivateKey(public, p, q)
    width, width_n = _width(public.n), (public.n.bit_length() + 7) // 8
    return b"".join(private.raw_decrypt(int(c)).to_bytes(width_n, "big") for c in _ints(ciphers, width))


def _big(value: int) -> bytes:
    return int(value).to_bytes((int(value).bit_length() + 7) // 8, "big")


def _run(pool: Any, function: Any, fixed: tuple[Any, ...], chunks: list[bytes], work: int) -> list[bytes]:
    """``function(*fixed, chunk)`` for each chunk: in ``pool`` when the work is large enough, else here."""
    if pool is None or work < SERIAL_BELOW or len(chunks) < 2:
        return [function(*fixed, chunk) for chunk in chunks]
    return list(pool.map(function, *([value] * len(chunks) for value in fixed), chunks))


def _chunks(data: bytes, item: int, parts: int) -> list[bytes]:
    """``data`` in at most ``parts`` chunks cut at multiples of ``item`` bytes (the last may be short)."""
    count = -(-len(data) // item)
    if count == 0:
        return [b""]
    step = math.ceil(count / max(1, parts))
    return [data[i * item:(i + step) * item] for i in range(0, count, step)]


# -- the two suites -----------------------------------------------------------------------------------

class Encrypted:
    """The label party's (with the private key) or a feature party's (public key only) Paillier arithmetic."""

    def __init__(self, public_key: PaillierPublicKey, private_key: PaillierPrivateKey | None = None,
                 pool: Any = None) -> None:
        self.public, self.private, self.pool = public_key, private_key, pool
        self.n = int(public_key.n)
        self.n2 = gmpy2.mpz(self.n) * self.n
        self.width = _width(self.n)
        self.width_n = (self.n.bit_length() + 7) // 8
        self.cores = getattr(pool, "workers", 1) if pool is not None else 1

    # the label party

    def encrypt(self, packed: Sequence[int]) -> bytes:
        """The rows' packed plaintexts, encrypted (fixed-width ciphertexts, back to back)."""
        data = b"".join((int(v) % self.n).to_bytes(self.width_n, "big") for v in packed)
        chunks = _chunks(data, self.width_n, self.cores * 4)
        return b"".join(_run(self.pool, encrypt_task, (_big(self.n), self.width_n), chunks, len(packed) * 8)
                        if chunks != [b""] else [])

    def decrypt(self, data: bytes) -> list[int]:
        """Plaintexts mod n of packed candidates."""
        assert self.private is not None, "only the key holder decrypts"
        if len(data) % self.width:
            raise ValueError("candidates are not a whole number of ciphertexts")
        chunks = _chunks(data, self.width, self.cores * 2)
        fixed = (_big(self.private.p), _big(self.private.q))
        plain = b"".join(_run(self.pool, decrypt_task, fixed, chunks, (len(data) // self.width) * 200))
        return [int.from_bytes(plain[i:i + self.width_n], "big") for i in range(0, len(plain), self.width_n)]

    # a feature party

    def read(self, data: bytes, rows: int) -> bytes:
        """The rows' ciphertexts as received, checked: ``rows`` units modulo n²."""
        if len(data) != rows * self.width:
            raise ValueError(f"expected {rows} ciphertexts of {self.width} bytes, got {len(data)} bytes")
        for i in range(0, len(data), self.width):
            c = int.from_bytes(data[i:i + self.width], "big")
            if not 0 < c < self.n2 or math.gcd(c, self.n) != 1:
                raise ValueError("a received ciphertext is not a unit modulo n²")
        return data

    def build(self, values: bytes, rows: np.ndarray, codes: np.ndarray, sizes: np.ndarray) -> list[Any]:
        """A node's histogram over its ``rows``: per feature, per bin the encrypted sum (flat, by :func:`offsets`)."""
        w = self.width
        ciphers = b"".join(values[r * w:(r + 1) * w] for r in rows.tolist())
        node_codes = np.ascontiguousarray(codes[rows])
        features = codes.shape[1]
        if self.pool is None or len(rows) * features < SERIAL_BELOW or features < 2:
            return _ints(histogram_task(_big(self.n), ciphers, node_codes.tobytes(), sizes.astype("<i8").tobytes()), w)
        groups = np.array_split(np.arange(features), min(features, self.cores))
        parts = self.pool.map(histogram_task, [_big(self.n)] * len(groups), [ciphers] * len(groups),
                              [np.ascontiguousarray(node_codes[:, g]).tobytes() for g in groups],
                              [sizes[g].astype("<i8").tobytes() for g in groups])
        return [v for part in parts for v in _ints(part, w)]

    def subtract(self, parent: list[Any], child: list[Any]) -> list[Any]:
        """The sibling's histogram: parent / child, entry by entry (Enc(a)·Enc(b)^−1 = Enc(a − b))."""
        return [a * gmpy2.invert(b, self.n2) % self.n2 for a, b in zip(parent, child)]

    def candidates(self, histogram: list[Any], sizes: np.ndarray, order: np.ndarray, per: int, field: int) -> bytes:
        """Every candidate's left sum, in the shuffled ``order``, packed ``per`` a ciphertext, re-randomized."""
        left = []
        at = 0
        for size in sizes.tolist():
            acc = gmpy2.mpz(1)
            for b in range(size - 1):
                acc = acc * histogram[at + b] % self.n2
                left.append(acc)
            at += size
        shuffled = _bytes([left[i] for i in order.tolist()], self.width)
        groups = max(1, math.ceil(len(left) / per))
        chunks = _chunks(shuffled, self.width * per, min(groups, self.cores * 2))
        return b"".join(_run(self.pool, pack_task, (_big(self.n), per, 2 * field), chunks, len(left) * 2 * field))


class Plain:
    """The same flow on floats (g and h in the clear): the development baseline."""

    def read(self, data: bytes, rows: int) -> np.ndarray:
        values = np.frombuffer(data, dtype="<f8")
        if values.shape != (2 * rows,) or not np.all(np.isfinite(values)):
            raise ValueError(f"expected {rows} finite (g, h) pairs")
        return values.reshape(rows, 2)

    def build(self, values: np.ndarray, rows: np.ndarray, codes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        gs, hs = histogram(codes[rows], sizes, values[rows, 0], values[rows, 1])
        return np.stack([gs, hs])

    def subtract(self, parent: np.ndarray, child: np.ndarray) -> np.ndarray:
        return parent - child

    def candidates(self, histogram: np.ndarray, sizes: np.ndarray, order: np.ndarray, per: int, field: int) -> bytes:
        return cumulative(histogram[0], histogram[1], sizes)[order].astype("<f8").tobytes()


def offsets(sizes: np.ndarray) -> np.ndarray:
    """Where each feature's bins start in a flat histogram."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def shuffle(count: int) -> np.ndarray:
    """A uniformly random order of ``count`` candidates, from the system's CSPRNG."""
    order = list(range(count))
    for i in range(count - 1, 0, -1):
        j = secrets.randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    return np.array(order, dtype=np.int64)

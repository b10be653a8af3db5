"""Paillier vectors for vertical learning: fixed-point encoding, batch encryption, ciphertext arithmetic, wire bytes.

Thin helpers over python-paillier (``phe``, with ``gmpy2``) for the additively homomorphic
scheme of Paillier, "Public-key cryptosystems based on composite degree residuosity classes"
(EUROCRYPT 1999), with phe's generator g = n + 1, so that Enc(m) = (1 + m·n)·r^n mod n².
phe checks the keys, draws r and decrypts (with CRT); this module works on
whole vectors of raw ciphertexts:

- **Fixed point.** A float vector becomes integers round(v·2^s) mod n, ``s`` fractional bits
  carried with the vector (:class:`CipherVector.scale`); negative values wrap to n − |m|.
  A value whose encoding would leave the safe third of the plaintext space is refused, never
  wrapped (:func:`encode`).
- **Cheap obfuscators.** The obfuscator is the whole cost of an encryption and does not depend
  on the message: by default each encrypting party draws them as h_s^α from a fixed base of its
  own and a table (Damgård–Jurik–Nielsen, :mod:`fednb.privacy.djn`; keys from Blum primes), about
  twenty times cheaper than r^n; with ``fixed_base=False``, :func:`obfuscators` computes r^n in a
  process pool, ahead of need. :func:`encrypt` then costs one multiplication per value.
- **Arithmetic.** Adding ciphertexts multiplies them; adding a plaintext multiplies by
  (1 + m·n) (with :func:`rerandomize` when the result leaves for a party that knows the
  summand); multiplying by a plaintext integer k raises to the k-th power; a plaintext matrix
  times a ciphertext vector (:func:`matvec`) goes bit by bit over all entries of a row at once
  (one squaring per bit, one multiplication per set bit), split across the pool by rows, with
  negative entries raised on the precomputed inverse.
- **Wire.** Ciphertexts travel as big-endian integers of a fixed width (the byte length of n²);
  decrypted values as fixed-width integers mod n. Python objects never cross the wire.

Parameters live in :class:`PaillierConfig`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import gmpy2
import numpy as np
from phe import paillier
from phe.paillier import PaillierPrivateKey as PrivateKey
from phe.paillier import PaillierPublicKey as PublicKey

from fednb.privacy.pool import ForkPool, task

KEY_BITS = (1024, 2048, 3072)


@dataclass(frozen=True)
class PaillierConfig:
    """Key size, fixed-point precision and parallelism of the Paillier work of one training run.

    ``precision`` is the fractional bits of encrypted values; ``multiplier_bits`` those of the
    plaintext numbers ciphertexts are raised to (features, coefficients): each bit costs one
    squaring per exponentiation, so it is kept to what float32-like features need.
    ``workers`` processes (default: every core) share the exponentiations; below
    ``serial_below`` of them the work stays in the calling process.
    """

    key_bits: int = 2048
    precision: int = 40
    multiplier_bits: int = 20
    workers: int | None = None
    serial_below: int = 256
    #: obfuscators h_s^α from a fixed base and a table (fednb.privacy.djn), not r^n: about 20× cheaper
    fixed_base: bool = True

    def __post_init__(self) -> None:
        if self.key_bits not in KEY_BITS:
            raise ValueError(f"key_bits must be one of {KEY_BITS}, not {self.key_bits!r}")
        for name, low, high in (("precision", 8, 96), ("multiplier_bits", 4, 48)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, not {value!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ValueError(f"workers must be a positive integer or None, not {self.workers!r}")

    @property
    def cores(self) -> int:
        return self.workers if self.workers is not None else (os.cpu_count() or 1)


@dataclass(frozen=True)
class CipherVector:
    """Paillier ciphertexts of one vector, with the fixed-point scale (fractional bits) of its plaintexts."""

    public_key: PublicKey
    ciphertexts: tuple[int, ...]
    scale: int

    def __len__(self) -> int:
        return len(self.ciphertexts)


def generate_keypair(config: PaillierConfig) -> tuple[PublicKey, PrivateKey]:
    """A fresh key pair of ``config.key_bits`` bits: Blum primes from phe's prime generator (the system's
    CSPRNG), as the fast obfuscators of :mod:`fednb.privacy.djn` assume."""
    from fednb.privacy.djn import generate_keypair as blum

    return blum(config.key_bits)


def open_pool(config: PaillierConfig) -> ForkPool:
    """``config.cores`` worker processes for exponentiations, to share over a training run (close it after).

    Forked (:mod:`fednb.privacy.pool`): the work crosses as bytes and integers, never pickled.
    """
    return ForkPool(config.cores)


# -- fixed point ------------------------------------------------------------------------------------

def encode(public_key: PublicKey, values: np.ndarray, scale: int) -> list[int]:
    """round(v·2^scale) mod n for each value; ValueError for a non-finite value or one too large to stay signed."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(array)):
        raise ValueError("cannot encode NaN or infinite values")
    n = public_key.n
    limit = n // 3  # sums and products must stay below n/2 to decode with their sign: keep room
    out = []
    for value in array.tolist():
        try:
            m = round(math.ldexp(value, scale))  # exact: scaling by 2^scale only moves the exponent
        except OverflowError:
            m = limit
        if abs(m) >= limit:
            raise ValueError(f"{value!r} at 2^{scale} does not fit a {n.bit_length()}-bit plaintext")
        out.append(m % n)
    return out


def decode(public_key: PublicKey, plaintexts: Sequence[int], scale: int) -> np.ndarray:
    """The signed floats of plaintexts mod n at 2^scale (values above n/2 are negative)."""
    n = public_key.n
    half = n // 2
    return np.array([(int(m) - n if m > half else int(m)) / (1 << scale) for m in plaintexts], dtype=np.float64)


# -- encryption -------------------------------------------------------------------------------------

@task
def _obfuscator_chunk(n_bytes: bytes, count: int) -> bytes:
    """``count`` values r^n mod n², with r from phe's CSPRNG; computed in a pool worker from the public n only."""
    n = int.from_bytes(n_bytes, "big")
    key = PublicKey(n)
    n2 = gmpy2.mpz(key.nsquare)
    width = _width(key)
    return b"".join(int(gmpy2.powmod(gmpy2.mpz(key.get_random_lt_n()), n, n2)).to_bytes(width, "big")
                    for _ in range(count))


def obfuscators(public_key: PublicKey, count: int, config: PaillierConfig, pool: Executor | None = None) -> list[int]:
    """``count`` fresh obfuscators r^n mod n², computed in ``pool`` (or here, for few)."""
    n_bytes = _int_bytes(public_key.n)
    if pool is None or count < 4:
        return from_wire_ints(_obfuscator_chunk(n_bytes, count), _width(public_key))
    parts = _split(count, config.cores)
    return from_wire_ints(b"".join(pool.map(_obfuscator_chunk, [n_bytes] * len(parts), parts)), _width(public_key))


class ObfuscatorStock:
    """Obfuscators computed ahead: :meth:`prefetch` queues them on the pool, :meth:`take` hands them out once each.

    A party prefetches the next batch's obfuscators as it uses this batch's, so that the pool
    computes them while the party waits for the other parties.
    """

    def __init__(self, public_key: PublicKey, config: PaillierConfig, pool: Executor | None = None) -> None:
        self.public_key, self.config, self.pool = public_key, config, pool
        self._ready: list[int] = []
        self._pending: list[Future[bytes]] = []
        from fednb.privacy.djn import FixedBase

        # DJN's fixed-base obfuscators are cheap enough to draw as needed (fednb.privacy.djn)
        self._fast: FixedBase | None = FixedBase(public_key) if config.fixed_base else None

    def prefetch(self, count: int) -> None:
        if self.pool is None or count < 1 or self._fast is not None:
            return
        n_bytes = _int_bytes(self.public_key.n)
        self._pending += [self.pool.submit(_obfuscator_chunk, n_bytes, part) for part in _split(count, self.config.cores)]

    def take(self, count: int) -> list[int]:
        width = _width(self.public_key)
        while len(self._ready) < count and self._pending:
            self._ready += from_wire_ints(self._pending.pop(0).result(), width)
        if len(self._ready) < count and self._fast is not None:
            self._ready += self._fast.draw(count - len(self._ready))
        if len(self._ready) < count:
            self._ready += obfuscators(self.public_key, count - len(self._ready), self.config, self.pool)
        taken, self._ready = self._ready[:count], self._ready[count:]
        return taken


def encrypt(public_key: PublicKey, values: np.ndarray, scale: int, masks: Sequence[int]) -> CipherVector:
    """Enc(round(v·2^scale)) for each value with the precomputed obfuscators ``masks`` (one each, used once)."""
    plaintexts = encode(public_key, values, scale)
    if len(masks) < len(plaintexts):
        raise ValueError(f"{len(plaintexts)} values need as many obfuscators, got {len(masks)}")
    n, n2 = gmpy2.mpz(public_key.n), gmpy2.mpz(public_key.nsquare)
    return CipherVector(public_key, tuple(int((1 + n * m) * r % n2) for m, r in zip(plaintexts, masks)), scale)


def decrypt_raw(private_key: PrivateKey, vector: CipherVector) -> list[int]:
    """The plaintexts mod n (no decoding): what the key holder sees of a masked vector."""
    return [private_key.raw_decrypt(c) for c in vector.ciphertexts]


def decrypt(private_key: PrivateKey, vector: CipherVector) -> np.ndarray:
    """The floats of a vector (for the one value the key holder may read in the clear, such as a loss)."""
    return decode(private_key.public_key, decrypt_raw(private_key, vector), vector.scale)


# -- arithmetic -------------------------------------------------------------------------------------

def add(a: CipherVector, b: CipherVector) -> CipherVector:
    """[[a + b]] for two vectors of one length and scale."""
    if len(a) != len(b) or a.scale != b.scale or a.public_key != b.public_key:
        raise ValueError("adding ciphertext vectors needs one key, one length and one scale")
    n2 = gmpy2.mpz(a.public_key.nsquare)
    return CipherVector(a.public_key, tuple(int(gmpy2.mpz(x) * y % n2) for x, y in zip(a.ciphertexts, b.ciphertexts)),
                        a.scale)


def add_plain(a: CipherVector, plaintexts: Sequence[int]) -> CipherVector:
    """[[a + m]] for plaintexts m mod n already at a's scale (no fresh randomness: see :func:`rerandomize`)."""
    if len(plaintexts) != len(a):
        raise ValueError(f"{len(a)} ciphertexts, {len(plaintexts)} plaintexts")
    n, n2 = gmpy2.mpz(a.public_key.n), gmpy2.mpz(a.public_key.nsquare)
    return CipherVector(a.public_key, tuple(int(gmpy2.mpz(c) * (1 + n * m) % n2)
                                            for c, m in zip(a.ciphertexts, plaintexts)), a.scale)


def rerandomize(a: CipherVector, masks: Sequence[int]) -> CipherVector:
    """The same plaintexts under fresh obfuscators, so that whoever knew the old ciphertexts cannot relate them."""
    if len(masks) < len(a):
        raise ValueError(f"{len(a)} ciphertexts need as many obfuscators, got {len(masks)}")
    n2 = gmpy2.mpz(a.public_key.nsquare)
    return CipherVector(a.public_key, tuple(int(gmpy2.mpz(c) * r % n2) for c, r in zip(a.ciphertexts, masks)), a.scale)


def with_scale(a: CipherVector, scale: int) -> CipherVector:
    """The same ciphertexts read at another scale: [[m]] at 2^s is [[m / 2^k]] at 2^(s+k) (a free division by 2^k)."""
    return CipherVector(a.public_key, a.ciphertexts, scale)


def multipliers(values: np.ndarray, bits: int) -> np.ndarray:
    """round(v·2^bits) as int64: the fixed-point plaintext numbers ciphertexts are raised to."""
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)) or np.max(np.abs(array), initial=0.0) * 2.0**bits >= 2.0**62:
        raise ValueError(f"multipliers must be finite and below 2^{62 - bits} in magnitude")
    return np.rint(array * 2.0**bits).astype(np.int64)


@task
def _matvec_chunk(n2_bytes: bytes, width: int, cipher_bytes: bytes, matrix: bytes, columns: int) -> bytes:
    """Rows of Π_i c_i^K[j,i] mod n², by bits (Horner over the exponents' bits, all bases at once).

    Each output is Π_t (Π_{i: bit t of |K[j,i]| set} b_i)^(2^t), with b_i the ciphertext or, for a
    negative exponent, its inverse (computed once per column): one squaring per bit of the largest
    exponent and one multiplication per set bit, instead of a whole exponentiation per entry
    (about a third of the multiplications for 20-bit exponents).
    """
    n2 = gmpy2.mpz(int.from_bytes(n2_bytes, "big"))
    bases = [gmpy2.mpz(c) for c in from_wire_ints(cipher_bytes, width)]
    inverses: list[gmpy2.mpz | None] = [None] * columns
    k = np.frombuffer(matrix, dtype=np.int64).reshape(-1, columns)
    out = []
    for row in k.tolist():
        terms = []
        for i, e in enumerate(row):
            if e > 0:
                terms.append((e, bases[i]))
            elif e < 0:
                inverse = inverses[i]
                if inverse is None:
                    inverse = inverses[i] = gmpy2.invert(bases[i], n2)
                terms.append((-e, inverse))
        acc = gmpy2.mpz(1)
        top = max((e.bit_length() for e, _ in terms), default=0)
        for bit in range(top - 1, -1, -1):
            acc = acc * acc % n2
            mask = 1 << bit
            for e, base in terms:
                if e & mask:
                    acc = acc * base % n2
        out.append(int(acc))
    return to_wire_ints(out, width)


def matvec(matrix: np.ndarray, vector: CipherVector, bits: int, config: PaillierConfig,
           pool: Executor | None = None) -> CipherVector:
    """[[M·v]] for a plaintext float matrix M (rows × len(v)) encoded at 2^bits: the result's scale is v's + bits."""
    k = multipliers(matrix, bits)
    if k.ndim != 2 or k.shape[1] != len(vector):
        raise ValueError(f"a matrix of shape {k.shape} cannot multiply a vector of {len(vector)} ciphertexts")
    key = vector.public_key
    width = _width(key)
    n2_bytes = _int_bytes(key.nsquare)
    cipher_bytes = to_wire_ints(vector.ciphertexts, width)
    rows, columns = k.shape
    if pool is None or rows * columns < config.serial_below:
        data = _matvec_chunk(n2_bytes, width, cipher_bytes, k.tobytes(), columns)
    else:
        bounds = np.cumsum([0] + _split(rows, config.cores))
        parts = [k[a:b].tobytes() for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        data = b"".join(pool.map(_matvec_chunk, [n2_bytes] * len(parts), [width] * len(parts),
                                 [cipher_bytes] * len(parts), parts, [columns] * len(parts)))
    return CipherVector(key, tuple(from_wire_ints(data, width)), vector.scale + bits)


def dot(values: np.ndarray, vector: CipherVector, bits: int) -> CipherVector:
    """[[Σ_i a_i·v_i]] as a one-element vector, for plaintext coefficients a at 2^bits."""
    return matvec(np.asarray(values, dtype=np.float64).reshape(1, -1), vector, bits, PaillierConfig(), None)


def total(vector: CipherVector) -> CipherVector:
    """[[Σ_i v_i]] as a one-element vector."""
    n2 = gmpy2.mpz(vector.public_key.nsquare)
    acc = gmpy2.mpz(1)
    for c in vector.ciphertexts:
        acc = acc * c % n2
    return CipherVector(vector.public_key, (int(acc),), vector.scale)


# -- wire -------------------------------------------------------------------------------------------

def _width(public_key: PublicKey) -> int:
    return (public_key.nsquare.bit_length() + 7) // 8


def _int_bytes(value: int) -> bytes:
    return int(value).to_bytes((int(value).bit_length() + 7) // 8, "big")


def _split(count: int, parts: int) -> list[int]:
    """``count`` items in at most ``parts`` near-equal positive chunks."""
    parts = max(1, min(parts, count))
    size = math.ceil(count / parts)
    return [min(size, count - i) for i in range(0, count, size)]


def to_wire_ints(values: Sequence[int], width: int) -> bytes:
    """Non-negative integers as big-endian ``width``-byte words, back to back."""
    return b"".join(int(v).to_bytes(width, "big") for v in values)


def from_wire_ints(data: bytes, width: int) -> list[int]:
    if len(data) % width:
        raise ValueError(f"{len(data)} bytes are not a whole number of {width}-byte integers")
    return [int.from_bytes(data[i:i + width], "big") for i in range(0, len(data), width)]


def to_bytes(vector: CipherVector) -> bytes:
    """The ciphertexts for the wire: fixed-width big-endian integers (the width of n²)."""
    return to_wire_ints(vector.ciphertexts, _width(vector.public_key))


def from_bytes(public_key: PublicKey, data: bytes, scale: int) -> CipherVector:
    """Ciphertexts from the wire; ValueError for a wrong length or a value that is not a unit below n²."""
    ciphertexts = from_wire_ints(data, _width(public_key))
    n, n2 = public_key.n, public_key.nsquare
    for c in ciphertexts:
        if not 0 < c < n2 or math.gcd(c, n) != 1:
            raise ValueError("a received ciphertext is not a unit modulo n²")
    return CipherVector(public_key, tuple(ciphertexts), scale)


def plaintext_width(public_key: PublicKey) -> int:
    """Byte width of a plaintext mod n on the wire (what the key holder returns of a masked vector)."""
    return (public_key.n.bit_length() + 7) // 8

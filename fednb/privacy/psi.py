"""Private set intersection by commutative blinding on Curve25519 (ECDH-PSI): aligns the rows of a vertical federation.

The Diffie–Hellman PSI of Meadows, "A more efficient cryptographic matchmaking protocol for use
in the absence of a continuously available third party" (IEEE S&P 1986), and Huberman, Franklin
and Hogg, "Enhancing privacy and trust in electronic communities" (EC 1999): two parties A and B
hash their ids to the curve, each raises the other's hashes to its own secret, and equal ids
meet as equal double-blinded points, H(x)^ab = H(x)^ba. Pure code: one function per stage and
role, numpy arrays in and out; the round loop carries the messages through the coordinator.

Stages (each party plays both; the coordinator only relays and counts):

1. **Blind** — :func:`blind`: a party draws a secret scalar, hashes each of its ids to the curve
   and sends its blinded points H(x)^a, in a secret random order, as a ``uint8`` array
   ``[n, 32]``. The hash never leaves the worker that computes it: no message holds H(x).
2. **DoubleBlind** — :func:`double_blind`: a party raises the other's blinded points to its own
   secret, H(y)^b ↦ H(y)^ba, and returns them in the order received.
3. **Intersect** — :func:`intersect`: with its own points double-blinded by the other (returned in
   stage 2) and the other's points double-blinded by itself, a party finds which of its own rows
   are in the intersection. Both parties order them by the canonical bytes of their id: each
   holds the same ids for the rows of the intersection, so the order agrees without a message,
   and unlike the double-blinded points (new secrets each run) it is the same in every run,
   so a seeded split over the aligned rows is reproducible. The coordinator, relaying both
   double-blinded vectors, counts the matches (:func:`intersection_size`).

What each party learns: a party learns which of *its own* rows are in the intersection, the size
of the other's set, and the positions of matches in the other's shuffled list (which say nothing
of the other's rows); nothing of the other's ids outside the intersection (DDH on the curve, with
the hash modelled as a random oracle). The coordinator sees only blinded and double-blinded
points, and learns the intersection size and both set sizes. Semi-honest parties: a party that
double-blinds with a wrong scalar spoils the result; it cannot make the other party's
secret leak, because every received point is checked (below).

The groups (:class:`PSIConfig.group`):

- ``"ed25519"`` (default): the prime-order subgroup of edwards25519 through libsodium.
  Hash to the curve: SHA-512 of the tagged id gives 64 bytes, each half is mapped by Elligator 2
  (``crypto_core_ed25519_from_uniform``, which also clears the cofactor) and the two points are
  added — the "map two field elements and add" construction of RFC 9380 (Brier et al., "Efficient
  indifferentiable hashing into ordinary elliptic curves", CRYPTO 2010), which is
  indifferentiable from a random oracle, unlike one Elligator map (that reaches about half of
  the points, with a distribution an adversary can tell from uniform). Blinding is
  ``crypto_scalarmult_ed25519_noclamp`` with a scalar uniform mod ℓ; libsodium rejects any
  received point that is non-canonical, of small order or outside the prime-order subgroup.
- ``"x25519"`` (what the parties use): about three times faster, as no subgroup check is
  needed. Hash to the curve: the id's 64-byte SHA-512 digest (as above), then SHA-512 of the
  digest and a one-byte counter, each reduced mod p = 2^255 − 19, give field elements u (RFC
  9380's hash_to_field), and the first u that is the u-coordinate of a point of Curve25519
  (u³ + 486662·u² + u a nonzero square mod p, Legendre's symbol from GMP through gmpy2) is
  taken: try-and-increment, a random oracle onto the curve's points up to sign, two tries on
  average. (Taking SHA-512's bytes as u directly would put about half of the ids on the
  quadratic twist, and whether a blinded point lies on the curve or the twist survives
  blinding: one bit of every id's hash would leak.)
  Blinding is X25519 (RFC 7748) through OpenSSL's assembly (``cryptography``), ≈ 28 µs here
  against libsodium's 36 µs; its clamped scalars clear the cofactor, so blinding commutes. A
  received point must be a canonical u of a point of the curve; a small-order one gives the
  all-zero output, which OpenSSL refuses.

Speed: an id costs one hash to the group and two scalar multiplications (its owner's blinding,
the other party's double blinding). On this machine's AMD EPYC cores that is ≈ 350 µs of CPU for
ed25519 (the subgroup check doubles each multiplication) and ≈ 65 µs for x25519 (two X25519 of
≈ 29 µs, the hash ≈ 6 µs): ≈ 2,900 and ≈ 15,000 ids per CPU-second (``bench/psi.py``), which is
close to the ≈ 17,000 that the two multiplications alone allow. The work is spread over a
process pool in chunks of bytes (:func:`open_pool`).
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from numbers import Integral
from typing import Literal

import gmpy2
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from nacl._sodium import ffi, lib  # the raw libsodium calls: no per-call copies in the hot loops
from nacl.bindings import crypto_core_ed25519_scalar_reduce

from fednb.privacy.pool import ForkPool, task

POINT = 32
STAGES = ("blind", "double_blind", "intersect")
#: Domain separation of the hash: another protocol hashing the same ids meets other points.
TAG = b"fednb-psi-v1\x00"

Group = Literal["ed25519", "x25519"]

#: Curve25519, v² = u³ + A·u² + u over GF(p) (RFC 7748).
_P = gmpy2.mpz(2**255 - 19)
_A = gmpy2.mpz(486662)


@dataclass(frozen=True)
class PSIConfig:
    """The parameters of one alignment: the group, and how the curve work is spread over cores.

    ``workers`` processes (default: every core) each take ``chunk`` ids at a time; below
    ``serial_below`` ids the work stays in the calling process (starting a pool costs more).
    """

    group: Group = "ed25519"
    workers: int | None = None
    chunk: int = 8192
    serial_below: int = 4096

    def __post_init__(self) -> None:
        if self.group not in ("ed25519", "x25519"):
            raise ValueError(f"group must be 'ed25519' or 'x25519', not {self.group!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ValueError(f"workers must be a positive integer or None, not {self.workers!r}")
        for name in ("chunk", "serial_below"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")

    @property
    def cores(self) -> int:
        return self.workers if self.workers is not None else (os.cpu_count() or 1)


@dataclass(frozen=True)
class PSIState:
    """What a party keeps between its stages: its secret scalar and the secret order it sent its rows in.

    ``order[k]`` is the row (index into the party's id list) whose point went out at position k.
    """

    config: PSIConfig
    secret: bytes = field(repr=False)
    order: np.ndarray = field(repr=False)
    ids: tuple[bytes, ...] = field(repr=False, default=())

    @property
    def size(self) -> int:
        return int(self.order.shape[0])


@dataclass(frozen=True)
class Alignment:
    """A party's result: ``rows`` are its own rows in the intersection, in the order both parties agree on."""

    rows: np.ndarray

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])


# -- ids ------------------------------------------------------------------------------------------

def canonical_ids(ids: Iterable[object]) -> list[bytes]:
    """Each id as bytes, so that both parties hash an id alike: integers as their decimal string.

    An id column read as integers at one party and as strings at the other (``133`` and
    ``"133"``) must meet; so integers become their decimal text, strings their UTF-8 bytes, and
    bytes stay as they are. Missing ids (None, NaN, empty) and floats (``1.0`` or ``"1.0"``?)
    are refused, as are duplicates (a duplicate would match twice and break the row order).
    """
    out: list[bytes] = []
    seen: dict[bytes, int] = {}
    for row, value in enumerate(ids):
        if isinstance(value, (bool, np.bool_)):
            raise ValueError(f"id at row {row} is a boolean ({value!r}); ids are strings or integers")
        if isinstance(value, Integral):
            data = str(int(value)).encode()
        elif isinstance(value, (str, np.str_)):
            data = str(value).encode("utf-8")
        elif isinstance(value, (bytes, np.bytes_)):
            data = bytes(value)
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"id at row {row} is missing")
        else:
            raise ValueError(f"id at row {row} is a {type(value).__name__} ({value!r}); ids are strings or integers")
        if not data:
            raise ValueError(f"id at row {row} is missing (empty)")
        if data in seen:
            raise ValueError(f"duplicate id {value!r} at rows {seen[data]} and {row}; ids must be unique")
        seen[data] = row
        out.append(data)
    return out


def _digest(id_: bytes) -> bytes:
    """64 bytes of SHA-512 over the tagged, length-prefixed id."""
    return hashlib.sha512(TAG + len(id_).to_bytes(4, "big") + id_).digest()


# -- the curve work, in chunks of bytes (what goes to a pool worker) ----------------------------

@task
def _hash_blind_chunk(group: str, secret: bytes, digests: bytes) -> bytes:
    """H(x)^a for each 64-byte digest in ``digests``; H(x) itself stays inside this function."""
    n = len(digests) // 64
    if group == "x25519":
        return _x25519(secret, [_curve_point(digests[64 * i:64 * (i + 1)]) for i in range(n)], hashed=True)
    out = bytearray(n * POINT)
    dst = ffi.from_buffer(out)
    src = ffi.from_buffer(digests)
    scalar = ffi.from_buffer(secret)
    first = ffi.new("unsigned char[32]")
    second = ffi.new("unsigned char[32]")
    point = ffi.new("unsigned char[32]")
    for i in range(n):
        lib.crypto_core_ed25519_from_uniform(first, src + 64 * i)
        lib.crypto_core_ed25519_from_uniform(second, src + 64 * i + 32)
        lib.crypto_core_ed25519_add(point, first, second)
        if lib.crypto_scalarmult_ed25519_noclamp(dst + POINT * i, scalar, point) != 0:
            raise ValueError("an id hashed to the identity (probability 2^-252): cannot blind it")
    return bytes(out)


@task
def _blind_chunk(group: str, secret: bytes, points: bytes) -> bytes:
    """P^a for each 32-byte point; ValueError at the first point that is not a valid one of the group."""
    n = len(points) // POINT
    if group == "x25519":
        received = [points[POINT * i:POINT * (i + 1)] for i in range(n)]
        for i, point in enumerate(received):
            if not _on_curve(int.from_bytes(point, "little"), canonical=True):
                raise ValueError(f"received point {i} is not a valid x25519 point of the curve")
        return _x25519(secret, received, hashed=False)
    out = bytearray(n * POINT)
    dst = ffi.from_buffer(out)
    src = ffi.from_buffer(points)
    scalar = ffi.from_buffer(secret)
    for i in range(n):
        if lib.crypto_scalarmult_ed25519_noclamp(dst + POINT * i, scalar, src + POINT * i) != 0:
            raise ValueError(f"received point {i} is not a valid {group} point of prime order")
    return bytes(out)


def _on_curve(u: int, *, canonical: bool = False) -> bool:
    """Whether u is the u-coordinate of a point of Curve25519 other than (0, 0), not of its twist.

    ``canonical``: u must also be below p (a received encoding; a hashed u is reduced already).
    """
    if canonical and u >= _P:
        return False
    value = gmpy2.mpz(u)
    return bool(gmpy2.legendre(((value + _A) * value + 1) * value % _P, _P) == 1)


def _curve_point(digest: bytes) -> bytes:
    """An id's point of Curve25519 (its u-coordinate) from its 64-byte digest, by try-and-increment.

    The first try reduces the digest itself mod p, try k + 1 SHA-512(digest ‖ k) for the byte k;
    the first field element that is a u-coordinate of the curve is kept: half of them are, so two
    tries on average.
    """
    candidate = digest
    for counter in range(256):
        u = int.from_bytes(candidate, "little") % _P
        if _on_curve(u):
            return int(u).to_bytes(POINT, "little")
        candidate = hashlib.sha512(digest + bytes([counter])).digest()
    raise ValueError("an id did not hash to the curve in 256 tries (probability 2^-256)")


def _x25519(secret: bytes, points: list[bytes], *, hashed: bool) -> bytes:
    """X25519(secret, P) for each point, through OpenSSL; a small-order point (all-zero output) is refused."""
    exchange, public = X25519PrivateKey.from_private_bytes(secret).exchange, X25519PublicKey.from_public_bytes
    out = []
    for i, point in enumerate(points):
        try:
            out.append(exchange(public(point)))
        except ValueError:
            if hashed:
                raise ValueError("an id hashed to a small-order point: cannot blind it") from None
            raise ValueError(f"received point {i} is not a valid x25519 point of prime order") from None
    return b"".join(out)


def open_pool(config: PSIConfig) -> ForkPool:
    """A pool of ``config.cores`` worker processes for the curve work, to share between stages (close it after).

    The workers are forked copies of this process (:mod:`fednb.privacy.pool`) in the same
    sandbox, holding its memory and open files, and run only the chunk functions above; the
    secret scalar and the chunks reach them as bytes over a local socket, never pickled and
    never off this machine.
    """
    return ForkPool(config.cores)


def _run(config: PSIConfig, work: str, secret: bytes, data: bytes, width: int, pool: Executor | None) -> bytes:
    """Apply one chunk function over ``data`` (items of ``width`` bytes), in a process pool when large."""
    function = _hash_blind_chunk if work == "hash_blind" else _blind_chunk
    n = len(data) // width
    if n < config.serial_below or (config.cores == 1 and pool is None):
        return function(config.group, secret, data)
    step = min(config.chunk, math.ceil(n / config.cores))
    chunks = [data[i * width:(i + step) * width] for i in range(0, n, step)]
    if pool is not None:
        return b"".join(pool.map(function, [config.group] * len(chunks), [secret] * len(chunks), chunks))
    with open_pool(config) as own:
        return b"".join(own.map(function, [config.group] * len(chunks), [secret] * len(chunks), chunks))


def _points(array: np.ndarray, what: str) -> bytes:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != POINT:
        raise ValueError(f"{what} must be a uint8 array of shape [n, {POINT}]")
    return np.ascontiguousarray(array).tobytes()


def _array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, POINT).copy()


# -- the stages ----------------------------------------------------------------------------------

def blind(ids: Sequence[object], config: PSIConfig | None = None, *,
          pool: Executor | None = None) -> tuple[PSIState, np.ndarray]:
    """Stage Blind: (the party's state, its blinded points H(x)^a in a secret random order, ``[n, 32]`` uint8).

    ``pool`` (from :func:`open_pool`) runs the curve work; without one, large inputs get a pool of their own.
    """
    config = config or PSIConfig()
    canonical = canonical_ids(ids)
    n = len(canonical)
    if config.group == "ed25519":
        secret = crypto_core_ed25519_scalar_reduce(secrets.token_bytes(64))  # uniform mod ℓ
    else:
        secret = secrets.token_bytes(POINT)  # clamped by X25519 itself
    # The order the points go out in is a secret permutation, so that the other party, which
    # learns where the matches sit in this list, learns nothing of this party's row numbers.
    order = _shuffled(n)
    digests = b"".join(_digest(canonical[row]) for row in order)
    blinded = _run(config, "hash_blind", secret, digests, 64, pool)
    return PSIState(config, secret, order, tuple(canonical)), _array(blinded)


def double_blind(state: PSIState, theirs: np.ndarray, *, pool: Executor | None = None) -> np.ndarray:
    """Stage DoubleBlind: the other party's blinded points raised to this party's secret, in the order received."""
    data = _points(theirs, "the other party's blinded points")
    if len(set(data[i:i + POINT] for i in range(0, len(data), POINT))) != len(data) // POINT:
        raise ValueError("the other party's blinded points repeat: its ids are not unique")
    return _array(_run(state.config, "blind", state.secret, data, POINT, pool))


def intersect(state: PSIState, mine: np.ndarray, theirs: np.ndarray) -> Alignment:
    """Stage Intersect: this party's rows in the intersection, ordered by their ids' canonical bytes.

    ``mine`` are this party's points as the other party double-blinded them (in the order this
    party sent them); ``theirs`` the other's points double-blinded by this party.
    """
    mine_bytes = _points(mine, "this party's double-blinded points")
    theirs_bytes = _points(theirs, "the other party's double-blinded points")
    if len(mine_bytes) // POINT != state.size:
        raise ValueError(f"got {len(mine_bytes) // POINT} double-blinded points back for {state.size} rows sent")
    other = {theirs_bytes[i:i + POINT] for i in range(0, len(theirs_bytes), POINT)}
    matched = [(mine_bytes[k * POINT:(k + 1) * POINT], int(state.order[k])) for k in range(state.size)
               if mine_bytes[k * POINT:(k + 1) * POINT] in other]
    if len({point for point, _ in matched}) != len(matched):
        raise ValueError("double-blinded points repeat: the other party did not blind this party's points faithfully")
    rows = sorted((row for _, row in matched), key=state.ids.__getitem__)
    return Alignment(np.array(rows, dtype=np.int64))


def intersection_size(a: np.ndarray, b: np.ndarray) -> int:
    """The coordinator's view: how many double-blinded points the two parties share, and nothing else."""
    a_bytes, b_bytes = _points(a, "double-blinded points"), _points(b, "double-blinded points")
    return len({a_bytes[i:i + POINT] for i in range(0, len(a_bytes), POINT)}
               & {b_bytes[i:i + POINT] for i in range(0, len(b_bytes), POINT)})


def _shuffled(n: int) -> np.ndarray:
    """A random permutation of range(n): rows sorted by 64-bit keys from the system's CSPRNG.

    (numpy only sorts here; the randomness is ``secrets``'. Equal keys, probability n²/2^65,
    fall back to row order, which costs a negligible bias and no secret.)
    """
    keys = np.frombuffer(secrets.token_bytes(8 * n), dtype=np.uint64)
    return np.argsort(keys, kind="stable").astype(np.int64)


def align(ids_a: Sequence[object], ids_b: Sequence[object], config: PSIConfig | None = None, *,
          pool: Executor | None = None) -> tuple[Alignment, Alignment]:
    """Both roles in one process, stage by stage, as the round loop runs them (for tests and benches)."""
    state_a, blinded_a = blind(ids_a, config, pool=pool)
    state_b, blinded_b = blind(ids_b, config, pool=pool)
    twice_a = double_blind(state_b, blinded_a, pool=pool)  # B → coordinator → A
    twice_b = double_blind(state_a, blinded_b, pool=pool)  # A → coordinator → B
    return intersect(state_a, twice_a, twice_b), intersect(state_b, twice_b, twice_a)

"""The cryptographic pieces of secure aggregation, all from ``cryptography``: keys, KDF, AEAD, PRG.

As in Bonawitz et al. (CCS 2017) and Bell et al. (SecAgg+, CCS 2020):

- key agreement: X25519; a pairwise key is HKDF-SHA256 of the shared point, with the purpose,
  run, round and the (sorted) pair of parties as HKDF's info, so that every round and every
  use gets a fresh key;
- shares travel under ChaCha20-Poly1305 with a random 96-bit nonce, the associated data binding
  (run, round, sender, receiver), so that a share replayed from another round or re-addressed
  to another party fails to open;
- the PRG expanding a 32-byte seed into a mask vector is the AES-128-CTR keystream under a key
  HKDF-SHA256 derives from the whole seed (a cryptographic PRG, unlike a Mersenne Twister seeded
  with 32 bits), drawn through OpenSSL's fastest AES kernel (:mod:`fednb.privacy.stream`), written
  straight into a numpy buffer and added or subtracted in place with wrapping unsigned
  arithmetic. 128-bit AES matches the security of the X25519 agreement that the pairwise seeds
  come from, and its ten rounds keystream about 15 % faster than AES-256's fourteen on that
  kernel (the masks are most of a party's work in a secure round);
- the model-hash statement is signed with Ed25519.

Nothing here logs; the callers log party names and counts only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import CipherContext
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .stream import keystream

SEED = 32
KEY = 32
SIGNATURE = 64
NONCE = 12
TAG = 16
#: Names the PRG in the round's setup: parties whose masks would not cancel refuse each other's rounds.
PRG = "aes-128-ctr32-from-2/hkdf-sha256"
_PRG_INFO = b"fednb secure aggregation prg: aes-128-ctr"
#: Values per slice of :func:`apply_masks`: 128 KiB of uint32, which a core's L2 cache holds with room to spare.
_SLICE = 1 << 15

__all__ = [
    "InvalidSignature", "InvalidTag", "Masks", "agree", "apply_masks", "commit", "context", "decode", "encode",
    "fresh_seed", "open_sealed", "prg", "prg_stream", "seal", "sign", "verify", "x25519_public", "x25519_private",
]


def fresh_seed() -> bytes:
    """32 bytes from the operating system's CSPRNG: a self-mask seed."""
    return os.urandom(SEED)


def context(*parts: str | int) -> bytes:
    """An unambiguous encoding of labelled fields (JSON of a list), for HKDF info, AEAD data and signatures."""
    return json.dumps(list(parts), separators=(",", ":")).encode()


def encode(data: bytes) -> str:
    """Bytes as base64 text, for a JSON message."""
    return base64.b64encode(data).decode("ascii")


def decode(text: object, length: int | None = None) -> bytes:
    """Base64 text back to bytes; ValueError for anything but strict base64 of ``length`` bytes."""
    if not isinstance(text, str) or len(text) > 4096:
        raise ValueError("expected base64 text")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("malformed base64") from exc
    if length is not None and len(data) != length:
        raise ValueError(f"expected {length} bytes, got {len(data)}")
    return data


def x25519_private(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def x25519_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def agree(private: X25519PrivateKey, public: bytes, info: bytes) -> bytes:
    """The 32-byte key HKDF-SHA256 derives from X25519(private, public) for the purpose ``info``.

    Raises ValueError for a public key of small order (the shared point would be all zeros).
    """
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """nonce || ChaCha20-Poly1305(plaintext), authenticated with ``associated``."""
    nonce = os.urandom(NONCE)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`seal`'s output; raises InvalidTag if anything was altered."""
    return ChaCha20Poly1305(key).decrypt(sealed[:NONCE], sealed[NONCE:], associated)


def commit(seed: bytes, label: bytes) -> bytes:
    """SHA-256 commitment to a 32-byte random seed (hiding because the seed is uniformly random)."""
    return hashlib.sha256(label + seed).digest()


def sign(key: Ed25519PrivateKey, statement: bytes) -> bytes:
    return key.sign(statement)


def verify(public: bytes, signature: bytes, statement: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``statement``."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, statement)
    except (InvalidSignature, ValueError):
        return False
    return True


def prg(seed: bytes, length: int, dtype: type[np.unsignedinteger] = np.uint32) -> np.ndarray:
    """``length`` uniformly random unsigned integers: the PRG's keystream under ``seed``."""
    out = np.zeros(length, dtype=dtype)
    apply_masks(out, [seed], [])
    return out


def prg_stream(seed: bytes) -> CipherContext:
    """The PRG under a 32-byte seed: the AES-128-CTR keystream of :func:`fednb.privacy.stream.keystream`
    (from the counter block 0^96 || 2), keyed by HKDF-SHA256 of the seed."""
    key = HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=_PRG_INFO).derive(seed)
    return keystream(key)


class Masks:
    """PRG(seed) added for each seed in ``plus`` and subtracted for each in ``minus``, part by part.

    :meth:`apply` masks the next values of one vector, in order: each seed's AES-CTR context
    carries its counter from one part to the next, so every seed still adds its one keystream
    to the whole vector, however it is cut. The vector is walked in parts that stay in the CPU's
    cache, so that each part, and the small keystream buffer, are read from memory once instead
    of once per seed; a caller that makes the vector part by part (quantization) masks each part
    while it is still in the cache. The arithmetic wraps modulo 2^32 or 2^64, which is also
    correct modulo any smaller power of two.
    """

    def __init__(self, plus: Iterable[bytes], minus: Iterable[bytes]) -> None:
        self._streams: list[tuple[CipherContext, np.ufunc]] = []
        for seeds, operation in ((plus, np.add), (minus, np.subtract)):
            for seed in seeds:
                if len(seed) != SEED:
                    raise ValueError("a mask seed is 32 bytes")
                self._streams.append((prg_stream(seed), operation))
        self._zeros = memoryview(b"")
        self._buffer = bytearray()

    def apply(self, part: np.ndarray) -> None:
        """Mask ``part``, the next values of the vector (a contiguous uint32 or uint64 slice), in place."""
        if part.dtype not in (np.uint32, np.uint64) or not part.flags.c_contiguous:
            raise ValueError("masks apply to a contiguous uint32 or uint64 vector")
        flat, item = part.reshape(-1), part.dtype.itemsize
        if not flat.size:
            return
        if len(self._zeros) < min(part.nbytes, 8 * _SLICE):  # sized by the first part, up to one slice
            self._zeros = memoryview(bytes(min(part.nbytes, 8 * _SLICE)))
            # update_into wants room for one block more than it writes
            self._buffer = bytearray(len(self._zeros) + 16)
        size = len(self._zeros) // item
        keystream = np.frombuffer(self._buffer, dtype=flat.dtype.newbyteorder("<"), count=size)
        for start in range(0, flat.size, size):
            piece = flat[start:start + size]
            n = piece.size
            for encryptor, operation in self._streams:
                encryptor.update_into(self._zeros[:n * item], self._buffer)
                operation(piece, keystream[:n], out=piece)


def apply_masks(vector: np.ndarray, plus: Iterable[bytes], minus: Iterable[bytes]) -> None:
    """Add PRG(seed) for each seed in ``plus`` to ``vector`` and subtract it for each in ``minus``, in place.

    ``vector`` is a contiguous uint32 or uint64 array, walked in cache-sized slices (see :class:`Masks`).
    """
    if vector.dtype not in (np.uint32, np.uint64) or not vector.flags.c_contiguous:
        raise ValueError("masks apply to a contiguous uint32 or uint64 vector")
    masks = Masks(plus, minus)
    flat = vector.reshape(-1)
    for start in range(0, flat.size, _SLICE):
        masks.apply(flat[start:start + _SLICE])

"""Vectors between the parties of hetero logistic regression: ciphertexts, or floats in plaintext mode, as bytes.

One message holds a count (4 bytes), then per vector its kind (1: ciphertexts), its fixed-point
scale (2 bytes), its length in bytes (8) and its body; the coordinator reads the one vector of a
masked gradient or loss the same way (:func:`body`, :func:`decrypt_masked`, :func:`decrypt_loss`). What a party
reads is checked against its model's key and the batch before use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fednb.errors import FederationError
from fednb.privacy import paillier


def pack(vectors: list[Any]) -> bytes:
    """Vectors (ciphertexts or, in plaintext mode, floats) as one byte string: count, then each."""
    parts = [len(vectors).to_bytes(4, "little")]
    for vector in vectors:
        data = paillier.to_bytes(vector) if isinstance(vector, paillier.CipherVector) else \
            np.asarray(vector, dtype="<f8").tobytes()
        parts += [(1 if isinstance(vector, paillier.CipherVector) else 0).to_bytes(1, "little"),
                  getattr(vector, "scale", 0).to_bytes(2, "little"), len(data).to_bytes(8, "little"), data]
    return b"".join(parts)


def read(data: bytes, key: paillier.PublicKey | None, rows: int) -> list[Any]:
    """The vectors :func:`pack` wrote, checked against the model's key (None: plaintext) and the batch."""
    count, offset, out = int.from_bytes(data[:4], "little"), 4, []
    if not 1 <= count <= 4:
        raise ValueError("a vector message holds 1 to 4 vectors")
    for _ in range(count):
        if offset + 11 > len(data):
            raise ValueError("a vector message is cut short")
        encrypted, scale = data[offset], int.from_bytes(data[offset + 1:offset + 3], "little")
        size = int.from_bytes(data[offset + 3:offset + 11], "little")
        body = data[offset + 11:offset + 11 + size]
        offset += 11 + size
        if len(body) != size:
            raise ValueError("a vector message is cut short")
        if encrypted:
            if key is None:
                raise ValueError("a ciphertext arrived in a plaintext run")
            vector: Any = paillier.from_bytes(key, body, scale)
        else:
            if key is not None:
                raise ValueError("plaintext arrived in an encrypted run")
            vector = np.frombuffer(body, dtype="<f8").copy()
        if len(vector) not in (rows, 1):
            raise ValueError(f"a vector of {len(vector)} values for a batch of {rows} rows")
        out.append(vector)
    return out


def decrypt_masked(private: Any, public: Any, data: np.ndarray, width: int) -> np.ndarray:
    """Masked ciphertexts → masked plaintexts mod n, as bytes (uniform: they say nothing of the gradient)."""
    if private is None:  # plaintext mode: the floats themselves
        return np.frombuffer(body(data.tobytes()), dtype=np.uint8).copy()
    vector = paillier.from_bytes(public, body(data.tobytes()), 0)
    return np.frombuffer(paillier.to_wire_ints(paillier.decrypt_raw(private, vector), width), dtype=np.uint8).copy()


def decrypt_loss(private: Any, public: Any, parts: Sequence[np.ndarray]) -> float:
    """The batch's loss from its parts: the label party's [[B·loss]] and each later feature party's masked cross
    terms, summed under encryption first (each part alone is masked; only the sum is the loss)."""
    if private is None:
        return float(sum(np.frombuffer(body(p.tobytes()), dtype="<f8")[0] for p in parts))
    vectors = []
    for part in parts:
        raw = part.tobytes()
        vectors.append(paillier.from_bytes(public, body(raw), int.from_bytes(raw[5:7], "little")))
    total = vectors[0]
    for vector in vectors[1:]:
        if vector.scale != total.scale or len(vector) != 1:
            raise FederationError("a cross term of the loss does not match the loss")
        total = paillier.add(total, vector)
    return float(paillier.decrypt(private, total)[0])


def body(data: bytes) -> bytes:
    """The one vector of a message :func:`pack` wrote, as the coordinator reads a masked gradient or the loss."""
    if len(data) < 15 or int.from_bytes(data[:4], "little") != 1:
        raise FederationError("a party sent a malformed vector")
    size = int.from_bytes(data[7:15], "little")
    if len(data) != 15 + size:
        raise FederationError("a party sent a malformed vector")
    return data[15:]

"""The arithmetic of a party of hetero logistic regression (:mod:`fednb.vertical.logistic`): its vectors under
Paillier or on floats, at the fixed-point scales of each stage, and the optimizer step on its own weights.
"""

from __future__ import annotations

import secrets
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Union

import numpy as np

from fednb.privacy import paillier
from fednb.privacy.paillier import CipherVector

if TYPE_CHECKING:
    from fednb.vertical.logistic import LogisticConfig

#: A vector between parties: ciphertexts, or floats in plaintext mode.
Vector = Union[CipherVector, np.ndarray]


class _Cipher:
    """The arithmetic a party needs, under Paillier (``public_key``) or on floats (None); scales in bits."""

    def __init__(self, config: LogisticConfig, public_key: paillier.PublicKey | None, pool: Executor | None) -> None:
        self.config, self.key, self.pool = config, public_key, pool
        self.p = config.paillier
        self.base = self.p.precision            # [[u_h]]
        self.residual = self.base + 2           # [[d]] = ¼·[[u]]: the same integers read 2 bits lower
        self.loss = self.base + self.p.multiplier_bits
        self.gradient = self.residual + self.p.multiplier_bits
        self.stock = paillier.ObfuscatorStock(public_key, self.p, pool) if public_key is not None else None

    def encrypt(self, values: np.ndarray, scale: int) -> Vector:
        if self.stock is None:
            return np.asarray(values, dtype=np.float64).copy()
        count = int(np.size(values))
        masks = self.stock.take(count)
        self.stock.prefetch(count)  # the next batch needs about as many: compute them while this one goes on
        return paillier.encrypt(self.stock.public_key, np.ravel(values), scale, masks)

    def add_plain(self, vector: Vector, values: np.ndarray) -> Vector:
        if isinstance(vector, np.ndarray):
            return vector + values
        return paillier.add_plain(vector, paillier.encode(vector.public_key, values, vector.scale))

    def add(self, a: Vector, b: Vector) -> Vector:
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return a + b
        assert isinstance(a, CipherVector) and isinstance(b, CipherVector)
        return paillier.add(a, b)

    def matvec(self, matrix: np.ndarray, vector: Vector) -> Vector:
        if isinstance(vector, np.ndarray):
            return matrix @ vector
        return paillier.matvec(matrix, vector, self.p.multiplier_bits, self.p, self.pool)

    def mask(self, vector: Vector) -> tuple[Vector, list[int]]:
        """[[v + r]] with r uniform mod n (perfectly hiding v); no mask in plaintext mode."""
        if isinstance(vector, np.ndarray):
            return vector.copy(), []
        r = [secrets.randbelow(vector.public_key.n) for _ in range(len(vector))]
        return paillier.add_plain(vector, r), r

    def unmask(self, values: np.ndarray | list[int], mask: list[int], scale: int) -> np.ndarray:
        if self.key is None:
            return np.asarray(values, dtype=np.float64)
        n = self.key.n
        return paillier.decode(self.key, [(int(v) - r) % n for v, r in zip(values, mask)], scale)


class _Optimizer:
    """SGD, or RMSprop (Tieleman and Hinton, 2012) with decay ``rho``, on one party's weights."""

    def __init__(self, config: LogisticConfig, size: int) -> None:
        self.config = config
        self.square = np.zeros(size)

    def step(self, weights: np.ndarray, gradient: np.ndarray) -> np.ndarray:
        c = self.config
        if c.optimizer == "sgd":
            return weights - c.lr * gradient
        self.square = c.rho * self.square + (1 - c.rho) * gradient**2
        return weights - c.lr * gradient / (np.sqrt(self.square) + c.eps)

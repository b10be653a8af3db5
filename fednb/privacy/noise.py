"""Noise from a cryptographic stream, never from numpy's generators: Gaussian for differential privacy,
uniform for secure aggregation's stochastic rounding.

:class:`SecureNormal` draws uniform doubles from a ChaCha20 keystream (``cryptography``) under a
fresh 256-bit key from ``os.urandom`` and turns each pair into two standard normals by the
Box–Muller transform. No one, the process that draws included, can replay or predict the noise,
as the Gaussian mechanism assumes; numpy's generators (PCG64, the legacy Mersenne Twister) are
predictable from their state, which any code in the process can read or set.

:class:`SecureUniform` draws uniforms on [0, 1), 32 random bits each, from an AES-128-CTR keystream
under its own ``os.urandom`` key, drawn through OpenSSL's fastest AES kernel
(:mod:`fednb.privacy.stream`; AES with hardware support is the fastest stream ``cryptography``
offers here, faster than numpy's PCG64; 128 bits, as secure aggregation's masks).

The floating-point attack on textbook Gaussian samplers (Mironov, CCS 2012) is not addressed:
an exact guarantee would need a discrete Gaussian.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from .stream import keystream

_CHUNK = 1 << 20  # uniform doubles per keystream read (8 MiB)


class SecureNormal:
    """Draws normal variates with ``normal(loc, scale, size)``, as numpy's ``Generator.normal`` is called."""

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(32) if key is None else key
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError("a ChaCha20 key is 32 bytes")
        # ChaCha20 in cryptography takes a 16-byte nonce (a 4-byte counter and 12 bytes); zero: the key is fresh
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def _uniform(self, count: int) -> np.ndarray:
        """``count`` doubles uniform on (0, 1]: 53 random bits each."""
        raw = np.frombuffer(self._stream.update(bytes(8 * count)), dtype="<u8")
        return ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 9007199254740992.0)

    def standard_normal(self, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.float64)
        done = 0
        while done < count:
            pairs = min((count - done + 1) // 2, _CHUNK // 2)
            u = self._uniform(2 * pairs)
            radius = np.sqrt(-2.0 * np.log(u[:pairs]))
            angle = (2.0 * math.pi) * u[pairs:]
            block = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
            take = min(block.size, count - done)
            out[done:done + take] = block[:take]
            done += take
        return out

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: Any = None) -> Any:
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
        shape = () if size is None else tuple(np.atleast_1d(np.asarray(size, dtype=np.int64)).tolist())
        count = int(np.prod(shape)) if shape else 1
        values = loc + scale * self.standard_normal(count)
        return float(values[0]) if size is None else values.reshape(shape)


class SecureUniform:
    """Fills float64 arrays with uniforms on [0, 1) on a grid of 2^-32, as ``Generator.random(out=…)`` does
    (numpy's has 53 bits): each value is one 32-bit keystream word times 2^-32, exactly."""

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(16) if key is None else key
        if not isinstance(key, bytes) or len(key) != 16:
            raise ValueError("an AES-128 key is 16 bytes")
        self._stream = keystream(key)
        self._zeros = memoryview(b"")
        self._buffer = bytearray()

    def random(self, size: Any = None, dtype: Any = np.float64, out: np.ndarray | None = None) -> Any:
        if np.dtype(dtype) != np.float64 or out is None or out.dtype != np.float64 or not out.flags.c_contiguous:
            raise TypeError("SecureUniform fills a contiguous float64 array: random(out=array)")
        count = out.size
        if len(self._zeros) < 4 * count:
            self._zeros = memoryview(bytes(4 * count))
            self._buffer = bytearray(4 * count + 16)  # update_into wants room for one block more than it writes
        self._stream.update_into(self._zeros[:4 * count], self._buffer)
        words = np.frombuffer(self._buffer, dtype="<u4", count=count)
        # every multiple of 2^-32 in [0, 1) equally likely; a 32-bit word times 2^-32 is exact in float64
        np.multiply(words, 2.0**-32, out=out.reshape(-1))
        return out

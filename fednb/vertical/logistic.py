"""Hetero logistic regression: a label party and feature parties train one model on their own columns.

The protocol of Hardy et al., "Private federated learning on vertically partitioned data via
entity resolution and additively homomorphic encryption" (arXiv 1711.10677, 2017): the logistic
loss is replaced by its second-order Taylor expansion at 0, so that its gradient is linear in
the scores and can be computed under Paillier encryption, and every gradient is **masked**
before the key holder decrypts it. Roles: the *guest* holds the labels y and its own features,
each *host* its own features, the *arbiter* (the coordinator) holds the Paillier secret key.
With u = Σ_p X_p·w_p over parties p, y± = 2y − 1 and a batch of B rows:

    loss ≈ log 2 − ½·y±·u + ⅛·u²          residual d = ∂loss/∂u = ¼·u − ½·y±
    gradient of party p: g_p = X_pᵀ·d / B + λ·w_p

Stages of one batch (one method per role each):

1. **Forward** — :meth:`Host.forward`: a host computes u_h = X_h·w_h and sends [[u_h]] to the
   guest, with [[⅛·Σu_h² + ½·B·λ·|w_h|²]] for the loss.
2. **Residual** — :meth:`Guest.residual`: the guest computes [[d]] = ¼·(Σ_h [[u_h]] + u_g) − ½·y±
   under fresh randomness (without it a host could divide out its own [[u_h]] and read
   ¼·u_g − ½·y±, the labels) and sends [[d]] to every host.
3. **Loss** — :meth:`Guest.loss`: the guest combines its plaintext terms, Σ u_h·(¼·u_g − ½·y±)
   under encryption and the hosts' loss parts (with several hosts, their cross terms
   from :meth:`Host.cross_loss`) into [[B·loss]]; :meth:`Arbiter.decrypt_loss` decrypts it.
4. **Gradient** — :meth:`Guest.gradient`, :meth:`Host.gradient`: each party computes
   [[X_pᵀ·d]] and adds a mask r_p drawn uniformly mod n (so the sum is uniform: perfectly
   hidden); :meth:`Arbiter.decrypt_gradient` decrypts only these masked values.
5. **Update** — :meth:`Guest.update`, :meth:`Host.update`: each party removes its mask, divides
   by B, adds its own λ·w_p in plaintext and takes an SGD or RMSprop step on its own weights.

What each party learns: the arbiter learns the loss of each batch and masked (uniformly
random) gradients, nothing else; a host learns [[d]], ciphertexts under a key it does not hold;
the guest learns [[u_h]] likewise. Weights never leave their party. **The messages [[u_h]] and
[[d]] must travel sealed between guest and hosts** (end to end, e.g. X25519 + ChaCha20-Poly1305)
when they are relayed by the arbiter, which holds the key that opens them. Prediction reveals
each party's u_p for the rows asked to whoever combines them (:func:`combine`); the
guest holds the intercept. ``encrypted=False`` runs the same algebra on floats: the baseline.
The arithmetic under the roles (vectors under Paillier or on floats, the optimizer) is in
:mod:`fednb.vertical.logistic_arithmetic`.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fednb.privacy import paillier
from fednb.privacy.paillier import CipherVector, PaillierConfig
from fednb.vertical.logistic_arithmetic import Vector, _Cipher, _Optimizer

STAGES = ("forward", "residual", "loss", "gradient", "update")


@dataclass(frozen=True)
class LogisticConfig:
    """One hetero logistic regression: optimisation, regularisation (λ = ``l2``) and encryption."""

    epochs: int = 20
    lr: float = 0.15
    batch_size: int = 240
    l2: float = 0.01
    optimizer: Literal["sgd", "rmsprop"] = "sgd"
    encrypted: bool = True
    paillier: PaillierConfig = field(default_factory=PaillierConfig)
    seed: int = 0
    rho: float = 0.99
    eps: float = 1e-6
    loss: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        for name in ("lr", "l2", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and name != "l2"):
                raise ValueError(f"{name} must be a finite number above 0 (l2: at least 0), not {value!r}")
        if self.optimizer not in ("sgd", "rmsprop"):
            raise ValueError(f"optimizer must be 'sgd' or 'rmsprop', not {self.optimizer!r}")
        if not 0 < self.rho < 1:
            raise ValueError(f"rho must lie in (0, 1), not {self.rho!r}")


def batches(rows: int, config: LogisticConfig, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch, from a seed every party shares (which rows go together is not secret)."""
    order = np.random.default_rng([config.seed, epoch]).permutation(rows)
    return [order[i:i + config.batch_size] for i in range(0, rows, config.batch_size)]


class _Party:
    """What guest and host share: their features, weights, optimizer and the masked-gradient stages."""

    def __init__(self, features: np.ndarray, config: LogisticConfig, public_key: paillier.PublicKey | None,
                 pool: Executor | None, intercept: bool) -> None:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or not np.all(np.isfinite(x)):
            raise ValueError("features must be a finite 2-d array (rows × columns)")
        self.intercept = intercept
        self.x = np.hstack([x, np.ones((len(x), 1))]) if intercept else x
        self.config = config
        self.cipher = _Cipher(config, public_key, pool)
        self.weights = np.zeros(self.x.shape[1])
        self.optimizer = _Optimizer(config, self.x.shape[1])
        self._rows: np.ndarray | None = None
        self._mask: list[int] = []

    def _penalty(self) -> np.ndarray:
        """λ·w, with the intercept unpenalized (as scikit-learn does)."""
        penalty = self.config.l2 * self.weights
        if self.intercept:
            penalty[-1] = 0.0
        return penalty

    def _norm(self) -> float:
        w = self.weights[:-1] if self.intercept else self.weights
        return float(w @ w)

    def gradient(self, residual: Vector) -> Vector:
        """Stage Gradient: [[X_bᵀ·d + r]] for this batch, with a fresh mask r this party keeps."""
        assert self._rows is not None, "gradient before forward/residual"
        masked, self._mask = self.cipher.mask(self.cipher.matvec(self.x[self._rows].T, residual))
        return masked

    def update(self, decrypted: np.ndarray | list[int]) -> None:
        """Stage Update: remove the mask, g = X_bᵀ·d / B + λ·w, one optimizer step on this party's weights."""
        assert self._rows is not None, "update before gradient"
        total = self.cipher.unmask(decrypted, self._mask, self.cipher.gradient)
        gradient = total / len(self._rows) + self._penalty()
        self.weights = self.optimizer.step(self.weights, gradient)
        self._mask = []

    def predict_part(self, features: np.ndarray) -> np.ndarray:
        """This party's u_p = X_p·w_p for the rows asked (the only thing prediction reveals of it)."""
        x = np.asarray(features, dtype=np.float64)
        if self.intercept:
            x = np.hstack([x, np.ones((len(x), 1))])
        return x @ self.weights


@dataclass(frozen=True)
class HostForward:
    """A host's Forward message: [[u_h]] for the batch and its part of [[B·loss]]."""

    scores: Vector
    loss: Vector | None


class Host(_Party):
    """A feature party: its own columns, weights that never leave it."""

    def __init__(self, features: np.ndarray, config: LogisticConfig, public_key: paillier.PublicKey | None = None,
                 pool: Executor | None = None) -> None:
        super().__init__(features, config, public_key, pool, intercept=False)
        self._scores: np.ndarray | None = None
        self._cross_mask = 0

    def forward(self, rows: np.ndarray, masked: bool = False) -> HostForward:
        """Stage Forward: [[u_h]] = [[X_h·w_h]] for the batch rows, and [[⅛·Σu_h² + ½·B·λ·|w_h|² − r]].

        ``masked``: this host will send cross terms (:meth:`cross_loss`) to the key holder; its loss part
        carries −r for a fresh r uniform mod n, and its cross terms +r, so that only their sum (inside the
        loss) means anything to whoever decrypts."""
        self._rows = np.asarray(rows)
        u = self._scores = self.x[self._rows] @ self.weights
        c = self.cipher
        loss = None
        self._cross_mask = 0
        if self.config.loss:
            part = u @ u / 8 + len(u) * self.config.l2 * self._norm() / 2
            loss = c.encrypt(np.array([part]), c.loss)
            if masked and isinstance(loss, CipherVector):
                self._cross_mask = secrets.randbelow(loss.public_key.n)
                loss = paillier.add_plain(loss, [(-self._cross_mask) % loss.public_key.n])
        return HostForward(c.encrypt(u, c.base), loss)

    def cross_loss(self, others: Sequence[Vector]) -> Vector:
        """[[¼·Σ_k u_h·u_k + r]] against earlier hosts' [[u_k]]: the cross terms of ⅛·u² with several hosts, under
        the mask r that :meth:`forward` took out of this host's loss part (freshly randomized)."""
        assert self._scores is not None and others, "cross_loss before forward, or without other hosts"
        total = self.cipher.matvec(self._scores.reshape(1, -1) / 4, others[0])
        for other in others[1:]:
            total = self.cipher.add(total, self.cipher.matvec(self._scores.reshape(1, -1) / 4, other))
        if isinstance(total, np.ndarray):
            return total
        masked = paillier.add_plain(total, [self._cross_mask])
        return paillier.rerandomize(masked, paillier.obfuscators(masked.public_key, 1, self.cipher.p))


class Guest(_Party):
    """The label party: labels y ∈ {0, 1}, its own columns, and the intercept."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, config: LogisticConfig,
                 public_key: paillier.PublicKey | None = None, pool: Executor | None = None) -> None:
        super().__init__(features, config, public_key, pool, intercept=True)
        y = np.asarray(labels)
        if y.shape != (len(self.x),) or not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be one 0/1 value per row")
        self.signs = 2.0 * y - 1.0
        self._scores: np.ndarray | None = None
        self._residual: Vector | None = None
        self._hosts: list[Vector] = []

    def residual(self, rows: np.ndarray, host_scores: Sequence[Vector]) -> Vector:
        """Stage Residual: [[d]] = ¼·(Σ_h [[u_h]] + u_g) − ½·y±, freshly randomized, for every host."""
        self._rows = np.asarray(rows)
        u = self._scores = self.x[self._rows] @ self.weights
        c = self.cipher
        plain = u / 4 - self.signs[self._rows] / 2
        if not host_scores:
            raise ValueError("the residual needs at least one host's scores")
        self._hosts = list(host_scores)
        total = self._hosts[0]
        for other in self._hosts[1:]:
            total = c.add(total, other)
        if isinstance(total, np.ndarray):
            d: Vector = total / 4 + plain
        else:
            # [[u_h]] at 2^s is [[¼·u_h]] at 2^(s+2); adding a fresh encryption of the guest's part
            # re-randomizes the sum, so a host cannot divide out its own [[u_h]].
            fresh = c.encrypt(plain, c.residual)
            assert isinstance(fresh, CipherVector)
            d = paillier.add(paillier.with_scale(total, c.residual), fresh)
        self._residual = d
        return d

    def loss(self, host_parts: Sequence[Vector], cross: Sequence[Vector] = ()) -> Vector:
        """Stage Loss: [[B·loss]] = the guest's plaintext terms + [[Σ u_h·(¼·u_g − ½·y±)]] + the hosts' parts."""
        assert self._scores is not None and self._rows is not None, "loss before residual"
        u, s = self._scores, self.signs[self._rows]
        b = len(u)
        mine = b * math.log(2) - (s @ u) / 2 + (u @ u) / 8 + b * self.config.l2 * self._norm() / 2
        c = self.cipher
        coefficients = (u / 4 - s / 2).reshape(1, -1)
        total: Vector = c.add_plain(c.matvec(coefficients, self._hosts[0]), np.array([mine]))
        for host in self._hosts[1:]:
            total = c.add(total, c.matvec(coefficients, host))
        for part in list(host_parts) + list(cross):
            total = c.add(total, part)
        return total

    def gradient(self, residual: Vector | None = None) -> Vector:
        """Stage Gradient for the guest: [[X_gᵀ·d + r]] on its own [[d]]."""
        assert self._residual is not None, "gradient before residual"
        return super().gradient(self._residual if residual is None else residual)


class Arbiter:
    """The coordinator's role: holds the Paillier secret key, decrypts masked gradients and the loss, nothing else.

    ``view`` records everything it decrypted, as (kind, party, plaintext), for tests and the audit log.
    """

    def __init__(self, config: LogisticConfig,
                 keys: tuple[paillier.PublicKey, paillier.PrivateKey] | None = None) -> None:
        """A fresh key pair of ``config.paillier.key_bits`` when encrypted, unless ``keys`` are given."""
        self.config = config
        self.public_key: paillier.PublicKey | None = None
        self._private: paillier.PrivateKey | None = None
        if config.encrypted:
            self.public_key, self._private = keys or paillier.generate_keypair(config.paillier)
        self.view: list[tuple[str, str, object]] = []

    def decrypt_gradient(self, party: str, masked: Vector) -> np.ndarray | list[int]:
        """Masked plaintexts mod n (uniform: they say nothing of the gradient) for ``party`` to unmask."""
        if isinstance(masked, np.ndarray):
            values: np.ndarray | list[int] = masked.copy()
        else:
            assert self._private is not None
            values = paillier.decrypt_raw(self._private, masked)
        self.view.append(("gradient", party, values))
        return values

    def decrypt_loss(self, loss: Vector, rows: int) -> float:
        """The batch's mean Taylor loss (the one value the arbiter reads in the clear)."""
        if isinstance(loss, np.ndarray):
            value = float(loss[0])
        else:
            assert self._private is not None
            value = float(paillier.decrypt(self._private, loss)[0])
        value /= rows
        self.view.append(("loss", "", value))
        return value


def combine(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Joint prediction: P(y = 1) = σ(Σ_p u_p) from each party's u_p for the same rows."""
    u = np.sum(np.asarray(parts, dtype=np.float64), axis=0)
    return 1.0 / (1.0 + np.exp(-u))


@dataclass
class Fitted:
    """A trained model as its roles hold it: the guest's and hosts' weights stay in their objects."""

    guest: Guest
    hosts: list[Host]
    arbiter: Arbiter
    losses: list[float]
    seconds: list[float]

    def predict(self, guest_features: np.ndarray, host_features: Sequence[np.ndarray]) -> np.ndarray:
        parts = [self.guest.predict_part(guest_features)]
        parts += [host.predict_part(x) for host, x in zip(self.hosts, host_features)]
        return combine(parts)


def fit(guest_features: np.ndarray, labels: np.ndarray, host_features: Sequence[np.ndarray],
        config: LogisticConfig, *, arbiter: Arbiter | None = None, pool: Executor | None = None,
        progress: Callable[[int, float], None] | None = None) -> Fitted:
    """All roles in one process, stage after stage as the round loop runs them (tests, benches, baselines)."""
    arbiter = arbiter or Arbiter(config)
    key = arbiter.public_key
    guest = Guest(guest_features, labels, config, key, pool)
    hosts = [Host(x, config, key, pool) for x in host_features]
    if any(len(h.x) != len(guest.x) for h in hosts):
        raise ValueError("every party must hold the same aligned rows")
    losses, seconds = [], []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        epoch_loss = 0.0
        for rows in batches(len(guest.x), config, epoch):
            forwards = [host.forward(rows, masked=k > 0) for k, host in enumerate(hosts)]
            residual = guest.residual(rows, [f.scores for f in forwards])
            if config.loss:
                cross = [hosts[k].cross_loss([forwards[j].scores for j in range(k)]) for k in range(1, len(hosts))]
                parts = [f.loss for f in forwards if f.loss is not None]
                epoch_loss += arbiter.decrypt_loss(guest.loss(parts, cross), len(rows)) * len(rows)
            guest.update(arbiter.decrypt_gradient("guest", guest.gradient()))
            for i, host in enumerate(hosts):
                host.update(arbiter.decrypt_gradient(f"host{i}", host.gradient(residual)))
        losses.append(epoch_loss / len(guest.x))
        seconds.append(time.perf_counter() - started)
        if progress is not None:
            progress(epoch, losses[-1])
    return Fitted(guest, hosts, arbiter, losses, seconds)


def fit_one_vs_rest(guest_features: np.ndarray, labels: np.ndarray, host_features: Sequence[np.ndarray],
                    config: LogisticConfig, *, pool: Executor | None = None) -> tuple[np.ndarray, list[Fitted]]:
    """Multiclass: one binary model per class (that class against the rest), under one arbiter key."""
    classes = np.unique(labels)
    arbiter = Arbiter(config)
    return classes, [fit(guest_features, (labels == k).astype(np.int64), host_features, config,
                         arbiter=arbiter, pool=pool) for k in classes]


def predict_one_vs_rest(classes: np.ndarray, models: Sequence[Fitted], guest_features: np.ndarray,
                        host_features: Sequence[np.ndarray]) -> np.ndarray:
    """The class whose model scores highest."""
    scores = np.stack([m.predict(guest_features, host_features) for m in models], axis=1)
    return classes[np.argmax(scores, axis=1)]

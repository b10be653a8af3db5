"""The party's side of secure aggregation: one method per stage of the paper (see :mod:`fednb.privacy.secagg`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fednb.privacy import masking, shamir
from fednb.privacy.noise import SecureUniform
from fednb.privacy.secagg import (
    PublicKeys,
    RoundSetup,
    SEALED,
    SHARE,
    STAGES,
    SecAggAbort,
    SecAggMessageError,
    _Roster,
    _Stages,
    _bytes,
    _fields,
    _names,
    _table,
)

log = logging.getLogger(__name__)


class SecAggParty:
    """One party's side of a secure round: keeps its secrets between stages and answers each stage once.

    ``min_parties`` is the smallest aggregate this party takes part in (``--min-aggregate``);
    ``clip`` clips its own update tighter than the round's clip; ``rng`` drives stochastic
    rounding only, from an AES-CTR stream under a fresh key unless a test passes a seeded numpy
    generator (masks and secrets always come from the operating system's CSPRNG).
    """

    def __init__(self, name: str, setup: RoundSetup, *, min_parties: int = 3, clip: float | None = None,
                 rng: np.random.Generator | SecureUniform | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a party's name is a non-empty string")
        if isinstance(min_parties, bool) or not isinstance(min_parties, int) or min_parties < 2:
            raise ValueError("min_parties is an integer of at least 2")
        if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a finite L2 norm above 0, not {clip!r}")
        self.name, self.setup, self.min_parties, self.clip = name, setup, min_parties, clip
        self._rng = rng if rng is not None else SecureUniform()
        self._stages = _Stages(name, STAGES, setup.round)
        self._encryption = X25519PrivateKey.generate()
        self._masking: X25519PrivateKey | None = X25519PrivateKey.generate()
        self._signing = Ed25519PrivateKey.generate()
        self._public = PublicKeys(masking.x25519_public(self._encryption), masking.x25519_public(self._masking),
                                  self._signing.public_key().public_bytes_raw())
        self._seed: bytes | None = None
        self._roster: _Roster | None = None
        self._model_hash = ""
        self._held: dict[str, tuple[bytes, bytes]] = {}
        self._share_keys: dict[str, bytes] = {}
        self._shared: set[str] = set()

    @property
    def stage(self) -> str:
        """The stage this party expects next ("done" or "aborted" at the end)."""
        return self._stages.current

    @property
    def fewest_inputs(self) -> int:
        """The fewest masked inputs a sum this party unmasks can hold (its threshold or its own floor,
        whichever is larger); known once the round's roster is (after ShareKeys)."""
        if self._roster is None:
            raise ValueError("the round's roster is not known before ShareKeys")
        return max(self._roster.threshold, self.min_parties)

    def _abort(self, message: str, party: str | None = None) -> SecAggAbort:
        return SecAggAbort(f"{self.name} {message}", party=party or self.name, round=self.setup.round)

    def _share_key(self, roster: _Roster, peer: str) -> bytes:
        """The AEAD key for shares between this party and ``peer`` (one agreement per peer and round)."""
        key = self._share_keys.get(peer)
        if key is None:
            try:
                key = masking.agree(self._encryption, roster.keys[peer].encryption,
                                    roster.pair("share key", self.name, peer))
            except ValueError:
                raise SecAggMessageError(f"{peer} advertised an unusable encryption key", party=peer) from None
            self._share_keys[peer] = key
        return key

    def advertise_keys(self) -> dict[str, str]:
        """AdvertiseKeys: the public keys this party uses in this round."""
        with self._stages.run("advertise_keys"):
            log.debug("%s advertises keys for round %d", self.name, self.setup.round)
            return self._public.to_dict()

    def share_keys(self, request: Mapping[str, Any], model_hash: bytes) -> dict[str, Any]:
        """ShareKeys: encrypted shares of b_u and s_u for each neighbour, a commitment to b_u, the signed model hash."""
        with self._stages.run("share_keys"):
            if not isinstance(model_hash, bytes) or not 16 <= len(model_hash) <= 64:
                raise ValueError("the model hash is 16 to 64 bytes")
            table = _fields(request, {"keys"}, "the coordinator", "a share-keys request")["keys"]
            if not isinstance(table, Mapping) or not all(isinstance(name, str) for name in table):
                raise SecAggMessageError("the coordinator relayed keys that are not a table by party", party=None)
            keys = {name: PublicKeys.from_dict(entry, name) for name, entry in table.items()}
            if keys.get(self.name) != self._public:
                raise self._abort("was relayed keys of its own that it did not advertise")
            if len(keys) < self.min_parties:
                raise self._abort(f"takes part only in rounds of at least {self.min_parties} parties; "
                                  f"{len(keys)} advertised keys")
            roster = self._roster = _Roster.build(self.setup, keys)
            assert self._masking is not None
            self._seed = masking.fresh_seed()
            holders = sorted(roster.holders(self.name))
            xs = [roster.index[holder] for holder in holders]
            seed_shares = shamir.split(self._seed, roster.threshold, xs)
            key_shares = shamir.split(self._masking.private_bytes_raw(), roster.threshold, xs)
            sealed = {}
            for holder, x in zip(holders, xs):
                pair = (seed_shares[x], key_shares[x])
                if holder == self.name:
                    self._held[holder] = pair
                    continue
                key = self._share_key(roster, holder)
                sealed[holder] = masking.encode(masking.seal(key, pair[0] + pair[1],
                                                             roster.label("share", self.name, holder)))
            self._model_hash = model_hash.hex()
            log.debug("%s shares keys with %d neighbours in round %d", self.name, len(sealed), self.setup.round)
            return {
                "shares": sealed,
                "commitment": masking.encode(masking.commit(self._seed, roster.label("self-mask", self.name))),
                "model_hash": self._model_hash,
                "transcript": roster.transcript.hex(),
                "signature": masking.encode(self._signing.sign(roster.statement(self.name, self._model_hash))),
            }

    def masked_input(self, request: Mapping[str, Any], update: np.ndarray, examples: int) -> dict[str, np.ndarray]:
        """MaskedInputCollection: check the neighbours' model hashes, open their shares, upload y_u."""
        with self._stages.run("masked_input"):
            roster = self._roster
            assert roster is not None and self._seed is not None and self._masking is not None
            vector = np.asarray(update)
            if vector.size != self.setup.dimension:
                raise ValueError(f"the update has {vector.size} values, the round {self.setup.dimension}")
            content = _fields(request, {"parties", "shares", "signatures"}, "the coordinator", "a masked-input request")
            shared = _names(content["parties"], set(roster.keys), "the coordinator", "the parties that shared keys")
            if self.name not in shared:
                raise self._abort("is not among the parties that shared keys, although it did")
            if len(shared) < max(roster.threshold, self.min_parties):
                raise self._abort(f"will not send its input: only {len(shared)} parties shared keys "
                                  f"(needs {max(roster.threshold, self.min_parties)})")
            peers = roster.neighbours[self.name] & shared
            signatures = _table(content["signatures"], peers, "the coordinator", "signatures")
            shares = _table(content["shares"], peers, "the coordinator", "shares")
            if set(signatures) != peers or set(shares) != peers:
                raise SecAggMessageError("the coordinator relayed shares or signatures not of exactly the neighbours "
                                         f"of {self.name} that shared keys", party=None, round=self.setup.round)
            for peer in sorted(peers):
                self._check_statement(roster, peer, signatures[peer])
            for peer in sorted(peers):
                self._open_share(roster, peer, shares[peer])
            plus, minus = [self._seed], list[bytes]()
            for peer in peers:
                seed = masking.agree(self._masking, roster.keys[peer].masking, roster.pair("mask", self.name, peer))
                (plus if self.name < peer else minus).append(seed)
            # quantized and masked slice by slice: q(x) is never whole in memory unmasked
            masks = masking.Masks(plus, minus)
            y = roster.quantizer.quantize(vector, examples, self._rng, self.clip, masks=masks.apply)
            # the party never needs b_u or s_u again: only its holders' shares of them can be revealed
            self._seed = self._masking = None
            self._shared = shared
            log.debug("%s sends its masked input (%d pairwise masks) in round %d", self.name, len(peers),
                      self.setup.round)
            return {"masked": y}

    def _check_statement(self, roster: _Roster, peer: str, entry: object) -> None:
        content = _fields(entry, {"model_hash", "transcript", "signature"}, peer, "a signed model hash")
        if content["transcript"] != roster.transcript.hex():
            raise self._abort(f"aborts the round: {peer} saw other advertised keys (the coordinator relayed "
                              f"different keys to different parties)", party=peer)
        if content["model_hash"] != self._model_hash:
            raise self._abort(f"aborts the round: {peer} received a different global model (two model hashes "
                              f"in one round)", party=peer)
        signature = _bytes(content["signature"], masking.SIGNATURE, peer, "signature")
        if not masking.verify(roster.keys[peer].signing, signature, roster.statement(peer, self._model_hash)):
            raise SecAggMessageError(f"{peer}'s signature of the model hash does not verify", party=peer,
                                     round=self.setup.round)

    def _open_share(self, roster: _Roster, peer: str, text: object) -> None:
        sealed = _bytes(text, SEALED, peer, "encrypted share")
        try:
            plain = masking.open_sealed(self._share_key(roster, peer), sealed, roster.label("share", peer, self.name))
        except masking.InvalidTag:
            raise SecAggMessageError(f"the share from {peer} fails authentication (forged, altered, or meant for "
                                     "another party or round)", party=peer, round=self.setup.round) from None
        seed_share, key_share = plain[:SHARE], plain[SHARE:]
        if seed_share[0] != masking.SEED or key_share[0] != masking.KEY:
            raise SecAggMessageError(f"the share from {peer} is not a share of 32-byte secrets", party=peer)
        self._held[peer] = (seed_share, key_share)

    def unmask(self, request: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        """Unmasking: shares of b_v for surviving neighbours, of s_v for dropped ones; never both for one party."""
        with self._stages.run("unmask"):
            roster = self._roster
            assert roster is not None
            content = _fields(request, {"survivors", "dropped"}, "the coordinator", "an unmasking request")
            known = set(roster.keys)
            survivors = _names(content["survivors"], known, "the coordinator", "survivors")
            dropped = _names(content["dropped"], known, "the coordinator", "dropped parties")
            both = survivors & dropped
            if both:
                raise self._abort(f"refuses to unmask: the request asks for both shares of {sorted(both)[0]}")
            if survivors | dropped != self._shared:
                raise self._abort("refuses to unmask: the survivors and dropped parties named are not the parties "
                                  "that shared keys")
            if self.name not in survivors:
                raise self._abort("refuses to unmask: the request names it as dropped although it sent its input")
            needed = max(roster.threshold, self.min_parties)
            if len(survivors) < needed:
                raise self._abort(f"refuses to unmask with {len(survivors)} survivors (needs at least {needed})")
            log.debug("%s unmasks for %d survivors and %d dropped in round %d", self.name, len(survivors),
                      len(dropped), self.setup.round)
            return {
                "self_mask_shares": {v: masking.encode(pair[0]) for v, pair in self._held.items() if v in survivors},
                "masking_key_shares": {v: masking.encode(pair[1]) for v, pair in self._held.items() if v in dropped},
            }

"""The handshake's cryptography: the keys of a session and the proofs that
bind it to both fresh nonces (the protocol itself is in ``frames.py``).

    hello_key  = HMAC(psk, "arr control v2 handshake")
    transcript = SHA-256("arr control v2" || HELLO payload || CHALLENGE payload without its proof)
    key_c2s    = HMAC(psk, "arr control v2 client to server" || transcript)
    key_s2c    = HMAC(psk, "arr control v2 server to client" || transcript)
    proof_s    = HMAC(key_s2c, "server proof");  proof_c = HMAC(key_c2s, "client proof")

Every key is an HMAC-SHA256 of the PSK under its own label, so no key of one
purpose (or direction, or session) is ever the key of another.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

LABEL = b"arr control v2"
HANDSHAKE_LABEL = LABEL + b" handshake"
C2S_LABEL = LABEL + b" client to server"
S2C_LABEL = LABEL + b" server to client"
SERVER_PROOF_LABEL = b"server proof"
CLIENT_PROOF_LABEL = b"client proof"


def hello_key(psk: bytes) -> bytes:
    """The key of the handshake's frames (HELLO, CHALLENGE, PROOF)."""
    return hmac.digest(psk, HANDSHAKE_LABEL, "sha256")


def transcript_hash(hello_payload: bytes, challenge_core: bytes) -> bytes:
    """Both greetings as sent: both nonces, both node ids, both versions.
    CHALLENGE_CORE is the CHALLENGE's payload without its proof."""
    return hashlib.sha256(LABEL + hello_payload + challenge_core).digest()


@dataclass(frozen=True)
class SessionKeys:
    """The keys of one session, one per direction (a frame reflected back to
    its sender fails the MAC), derived from the PSK and the transcript."""

    client_to_server: bytes
    server_to_client: bytes

    @classmethod
    def derive(cls, psk: bytes, transcript: bytes) -> "SessionKeys":
        return cls(hmac.digest(psk, C2S_LABEL + transcript, "sha256"),
                   hmac.digest(psk, S2C_LABEL + transcript, "sha256"))

    def server_proof(self) -> bytes:
        return hmac.digest(self.server_to_client, SERVER_PROOF_LABEL, "sha256")

    def client_proof(self) -> bytes:
        return hmac.digest(self.client_to_server, CLIENT_PROOF_LABEL, "sha256")


class SeenNonces:
    """The nonces of the last CAPACITY authentic HELLOs a server took, so that
    a HELLO replayed while remembered is refused at once. Bounded: only HELLOs
    MACed with the key get in, and the oldest is forgotten first (a replay of
    a forgotten one still fails, at the PROOF it cannot give)."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._nonces: dict[bytes, None] = {}  # insertion-ordered: the oldest first

    def remember(self, nonce: bytes) -> bool:
        """True if NONCE is new (and is remembered now); False if seen before."""
        if nonce in self._nonces:
            return False
        self._nonces[nonce] = None
        if len(self._nonces) > self.capacity:
            del self._nonces[next(iter(self._nonces))]
        return True

    def __len__(self) -> int:
        return len(self._nonces)

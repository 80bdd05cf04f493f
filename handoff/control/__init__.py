"""The authenticated control channel between routers and agents.

``frames`` is the protocol without I/O (framing, the challenge-response
handshake, HMAC with keys per session and direction, replay counters, message
codecs); ``channel`` runs it over asyncio (``ControlServer`` for the agent,
``ControlClient`` for the router) with bounded sessions, and reads the key
(``load_psk``); ``handshake`` holds the handshake's key derivation, and
``outbound`` the bounded, never-awaited sending and the rejection log.
"""

from handoff.control.channel import ControlClient, ControlServer, ServerSession, load_psk
from handoff.control.frames import (
    CLOSED_TARGET_GONE, FRAME_VERSION, MAX_FRAME, MAX_HANDSHAKE_FRAME, MAX_HOLDING_KEYS, PROTOCOL_VERSION,
    REASONS, Ack, Challenge, Closed, ControlConnection, ControlError, Established, FlowKey, HandoffRequest,
    Hello, Holding, Message, MessageType, Nack, Ping, Proof, Release, SeenNonces, StopMirror, TAKEN_CLOSED,
    TAKEN_OK, TAKEN_UNACKED, TAKEN_UNKNOWN, UNACKED_ASK_AGAIN, Shift, Taken, TakeBack,
)
from handoff.control.outbound import CHANNEL_REASONS, ControlUnavailable, FrameSender
from handoff.translate import Translation

__all__ = [
    "CHANNEL_REASONS", "CLOSED_TARGET_GONE", "Holding", "MAX_HANDSHAKE_FRAME", "MAX_HOLDING_KEYS", "Release",
    "Ack", "Challenge", "Closed", "ControlClient", "ControlConnection", "ControlError", "ControlServer",
    "ControlUnavailable", "Established", "FRAME_VERSION", "FlowKey", "FrameSender", "HandoffRequest", "Hello",
    "MAX_FRAME", "Message", "MessageType", "Nack", "PROTOCOL_VERSION", "Ping", "Proof", "REASONS",
    "SeenNonces", "ServerSession", "Shift", "StopMirror",
    "TAKEN_CLOSED", "TAKEN_OK", "TAKEN_UNACKED", "TAKEN_UNKNOWN", "Taken", "TakeBack", "UNACKED_ASK_AGAIN",
    "Translation", "load_psk",
]

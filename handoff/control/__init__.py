"""The authenticated control channel between routers and agents.

``frames`` is the protocol without I/O (framing, HMAC, replay counters,
message codecs); ``channel`` runs it over asyncio (``ControlServer`` for the
agent, ``ControlClient`` for the router) and reads the key (``load_psk``).
"""

from handoff.control.channel import (
    ControlClient, ControlServer, ControlUnavailable, ServerSession, load_psk,
)
from handoff.control.frames import (
    CLOSED_TARGET_GONE, FRAME_VERSION, MAX_FRAME, MAX_HOLDING_KEYS, PROTOCOL_VERSION, REASONS, Ack, Closed,
    ControlConnection, ControlError, FlowKey, HandoffRequest, Hello, Holding, Message, MessageType, Nack,
    Ping, Release, StopMirror, TAKEN_CLOSED, TAKEN_OK, TAKEN_UNACKED, TAKEN_UNKNOWN, Taken, TakeBack,
)
from handoff.translate import Translation

__all__ = [
    "CLOSED_TARGET_GONE", "Holding", "MAX_HOLDING_KEYS", "Release",
    "Ack", "Closed", "ControlClient", "ControlConnection", "ControlError", "ControlServer",
    "ControlUnavailable", "FRAME_VERSION", "FlowKey", "HandoffRequest", "Hello", "MAX_FRAME", "Message",
    "MessageType", "Nack", "PROTOCOL_VERSION", "Ping", "REASONS", "ServerSession", "StopMirror",
    "TAKEN_CLOSED", "TAKEN_OK", "TAKEN_UNACKED", "TAKEN_UNKNOWN", "Taken", "TakeBack",
    "Translation", "load_psk",
]

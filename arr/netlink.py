"""The one place in arr that talks netlink (via pyroute2).

Everything here takes the *name* of a network namespace registered under
``/var/run/netns`` (the ``ip netns`` convention) and acts inside it. The
calling thread never changes namespace: netlink sockets are opened inside the
target namespace by pyroute2, and the few things that have to be done from
inside a namespace (``/proc/sys`` writes, opening a socket there) run in a
short-lived helper thread that enters the namespace and then exits.

Sections:

* namespaces: :func:`netns_create`, :func:`netns_delete`, :func:`netns_list`,
  :func:`netns_exists`, :func:`netns_pids`, :func:`run_in_netns`,
  :func:`socket_in_netns`
* links: :func:`veth_create`, :func:`bridge_create`, :func:`link_set_master`,
  :func:`link_up`, :func:`link_index`, :func:`link_names`
* addresses and routes: :func:`addr_add`, :func:`route_add`,
  :func:`route_add_default`
* sysctls: :func:`sysctl_set`, :func:`sysctl_get`
* counters: :func:`link_counters`
* interfaces of routes and addresses: :func:`route_interface`,
  :func:`address_interface`
* tc: :func:`bpf_attach`, :func:`bpf_detach`, :func:`bpf_filters` (clsact,
  cls_bpf direct-action)
* TCP sockets (sock_diag, no pyroute2; codec in :mod:`arr.inet_diag`):
  :func:`tcp_sockets`, :func:`tcp_socket`, :func:`destroy_tcp_socket`

Functions of the last three sections also accept ``ns=None``: the caller's own
namespace, which is where ``arr serve`` and ``arr agent`` run.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import ipaddress
import os
import socket
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as _pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from arr import inet_diag
from arr.inet_diag import Address, TcpSocket, TcpState

NETNS_RUN_DIR = "/var/run/netns"
IFNAMSIZ_MAX = 15  # usable characters of an interface name
_CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class NetlinkOpError(RuntimeError):
    """A netlink operation failed; the message says which one and where."""


# --------------------------------------------------------------------------
# namespaces
# --------------------------------------------------------------------------


def _ns_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad netns name: {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


def netns_create(name: str) -> None:
    """Create a network namespace registered as /var/run/netns/NAME.

    Fails if it already exists. Works like ``ip netns add`` (pyroute2 does
    the unshare in a child process, the caller is not moved).
    """
    if netns_exists(name):
        raise NetlinkOpError(f"netns {name!r} already exists")
    _pr_netns.create(name)
    if not netns_exists(name):  # pragma: no cover - defensive
        raise NetlinkOpError(f"netns {name!r} was not created")


def netns_delete(name: str, missing_ok: bool = True) -> bool:
    """Unregister a namespace (veths in it go away with it).

    Returns True if something was removed. The kernel frees the namespace
    once no process lives in it any more (see :func:`netns_pids`).
    """
    path = _ns_path(name)
    if not os.path.exists(path):
        if missing_ok:
            return False
        raise NetlinkOpError(f"netns {name!r} does not exist")
    _pr_netns.remove(name)
    return True


def netns_list(prefix: str = "") -> list[str]:
    """Names of registered namespaces (optionally only those with PREFIX)."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def netns_exists(name: str) -> bool:
    return os.path.exists(_ns_path(name))


def netns_pids(name: str) -> list[int]:
    """PIDs of processes whose network namespace is NAME (like ``ip netns pids``)."""
    try:
        st = os.stat(_ns_path(name))
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            pst = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (pst.st_ino, pst.st_dev) == (st.st_ino, st.st_dev):
            pids.append(int(entry))
    return sorted(pids)


_libc = ctypes.CDLL(None, use_errno=True)


def _on_thread(fn: Callable[[], T], name: str) -> T:
    """Run FN on a fresh short-lived thread, wait, return its result or re-raise."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            error.append(e)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def run_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run FN in a fresh thread that has joined namespace NAME; return its result.

    The thread exits afterwards, so no thread of the caller is left in
    another namespace. Sockets created inside FN stay bound to NAME.
    """

    def joined() -> T:
        join_netns(name)
        return fn()

    return _on_thread(joined, f"netns-{name}")


def join_netns(name: str) -> None:
    """Move the CALLING THREAD into namespace NAME for good. Only for threads
    made for it (see run_in_netns); never the main thread."""
    fd = os.open(_ns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def socket_in_netns(
    name: str,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,  # noqa: A002 - mirrors socket.socket
    proto: int = 0,
) -> socket.socket:
    """A socket living in namespace NAME, usable from any thread."""
    return run_in_netns(name, lambda: socket.socket(family, type, proto))


# --------------------------------------------------------------------------
# netlink plumbing
# --------------------------------------------------------------------------


_NETLINK_ROUTE = 0


@contextmanager
def ipr(ns: str | None) -> Iterator[IPRoute]:
    """An IPRoute bound to namespace NS (never creates the namespace); None:
    the caller's own namespace.

    The rtnetlink socket is opened in NS by a short-lived thread (see
    :func:`run_in_netns`) and handed to pyroute2 by fd: much cheaper than
    pyroute2's own ``netns=`` path, which forks a helper process per socket.
    """
    # pyroute2 runs its own event loop; give it a private stock one, since the
    # process-wide policy may be uvloop's, whose loops cannot open netlink sockets.
    loop = asyncio.SelectorEventLoop()
    try:
        if ns is None:
            with IPRoute(use_event_loop=loop) as own:
                yield own
            return
        if not netns_exists(ns):
            raise NetlinkOpError(f"netns {ns!r} does not exist")
        sock = socket_in_netns(ns, socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE)
        fd = sock.detach()  # pyroute2 owns (and closes) the fd from here on
        try:
            ip = IPRoute(fileno=fd, use_event_loop=loop)
        except BaseException:
            os.close(fd)
            raise
        with ip:
            yield ip
    finally:
        loop.close()


def _call(what: str, ns: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except NetlinkError as e:
        raise NetlinkOpError(f"{what} in netns {ns!r}: {e}") from e


def _check_ifname(ifname: str) -> None:
    if not ifname or len(ifname) > IFNAMSIZ_MAX or "/" in ifname or " " in ifname:
        raise ValueError(f"bad interface name {ifname!r} (1..{IFNAMSIZ_MAX} chars)")


def _index(ip: IPRoute, ns: str, ifname: str) -> int:
    idx = ip.link_lookup(ifname=ifname)
    if not idx:
        raise NetlinkOpError(f"no interface {ifname!r} in netns {ns!r}")
    return int(idx[0])


# --------------------------------------------------------------------------
# links
# --------------------------------------------------------------------------


def link_index(ns: str, ifname: str) -> int:
    with ipr(ns) as ip:
        return _index(ip, ns, ifname)


def link_names(ns: str) -> list[str]:
    with ipr(ns) as ip:
        return sorted(str(m.get_attr("IFLA_IFNAME")) for m in ip.get_links())


def veth_create(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """Create a veth pair: IF_A in NS_A, its peer IF_B directly in NS_B.

    Both ends start down. Nothing is ever created in the caller's namespace.
    """
    _check_ifname(if_a)
    _check_ifname(if_b)
    if not netns_exists(ns_b):
        raise NetlinkOpError(f"netns {ns_b!r} does not exist")
    fd = os.open(_ns_path(ns_b), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with ipr(ns_a) as ip:
            _call(
                f"veth {if_a}<->{ns_b}/{if_b}",
                ns_a,
                lambda: ip.link(
                    "add",
                    ifname=if_a,
                    kind="veth",
                    peer={"ifname": if_b, "net_ns_fd": fd},
                ),
            )
    finally:
        os.close(fd)


def bridge_create(ns: str, name: str) -> None:
    """Create a Linux bridge NAME in NS (STP off: ports forward at once)."""
    _check_ifname(name)
    with ipr(ns) as ip:
        _call(f"bridge {name}", ns, lambda: ip.link("add", ifname=name, kind="bridge", br_stp_state=0))


def link_set_master(ns: str, ifname: str, master: str) -> None:
    with ipr(ns) as ip:
        idx, midx = _index(ip, ns, ifname), _index(ip, ns, master)
        _call(f"{ifname} master {master}", ns, lambda: ip.link("set", index=idx, master=midx))


def link_up(ns: str, ifname: str) -> None:
    with ipr(ns) as ip:
        idx = _index(ip, ns, ifname)
        _call(f"{ifname} up", ns, lambda: ip.link("set", index=idx, state="up"))


# --------------------------------------------------------------------------
# addresses and routes
# --------------------------------------------------------------------------


def link_set_mtu(ns: str, ifname: str, mtu: int) -> None:
    with ipr(ns) as ip:
        index = _index(ip, ns, ifname)
        _call(f"set mtu {mtu} on {ifname}", ns, lambda: ip.link("set", index=index, mtu=mtu))


def addr_add(ns: str, ifname: str, cidr: str) -> None:
    """Add an address like ``10.200.1.11/24`` to IFNAME in NS."""
    iface = ipaddress.ip_interface(cidr)
    with ipr(ns) as ip:
        idx = _index(ip, ns, ifname)
        _call(
            f"addr {cidr} on {ifname}",
            ns,
            lambda: ip.addr(
                "add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen
            ),
        )


def route_add(ns: str, dst: str, gateway: str) -> None:
    """Route DST (a CIDR) via GATEWAY in NS."""
    net = ipaddress.ip_network(dst, strict=True)
    with ipr(ns) as ip:
        _call(
            f"route {dst} via {gateway}",
            ns,
            lambda: ip.route("add", dst=str(net.network_address), dst_len=net.prefixlen, gateway=gateway),
        )


def route_add_default(ns: str, gateway: str) -> None:
    with ipr(ns) as ip:
        _call(f"default via {gateway}", ns, lambda: ip.route("add", dst="default", gateway=gateway))


def routes(ns: str) -> list[dict[str, object]]:
    """Main-table IPv4 routes in NS as plain dicts (dst, dst_len, gateway, oif)."""
    out = []
    with ipr(ns) as ip:
        for r in ip.get_routes(family=socket.AF_INET, table=254):
            out.append(
                {
                    "dst": r.get_attr("RTA_DST") or "default",
                    "dst_len": r["dst_len"],
                    "gateway": r.get_attr("RTA_GATEWAY"),
                    "oif": r.get_attr("RTA_OIF"),
                }
            )
    return out


# --------------------------------------------------------------------------
# sysctls (per namespace: /proc/sys/net/* is per netns)
# --------------------------------------------------------------------------


def _sysctl_path(key: str) -> str:
    if ".." in key or key.startswith("/"):
        raise ValueError(f"bad sysctl key {key!r}")
    return "/proc/sys/" + key.replace(".", "/")


def sysctl_set(ns: str, settings: Mapping[str, str | int]) -> None:
    """Write sysctls (``{"net.ipv4.ip_forward": 1}``) inside NS only."""
    items = [(_sysctl_path(k), str(v)) for k, v in settings.items()]

    def write() -> None:
        for path, value in items:
            with open(path, "w") as f:
                f.write(value)

    run_in_netns(ns, write)


def sysctl_get(ns: str, key: str) -> str:
    path = _sysctl_path(key)

    def read() -> str:
        with open(path) as f:
            return f.read().strip()

    return run_in_netns(ns, read)


# --------------------------------------------------------------------------
# counters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Counters:
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.rx_bytes - other.rx_bytes,
            self.tx_bytes - other.tx_bytes,
            self.rx_packets - other.rx_packets,
            self.tx_packets - other.tx_packets,
        )


def link_counters(ns: str) -> dict[str, Counters]:
    """Per-interface byte/packet counters in NS (IFLA_STATS64)."""
    out: dict[str, Counters] = {}
    with ipr(ns) as ip:
        for m in ip.get_links():
            st = m.get_attr("IFLA_STATS64") or m.get_attr("IFLA_STATS")
            name = str(m.get_attr("IFLA_IFNAME"))
            if st is None:
                out[name] = Counters(0, 0, 0, 0)
                continue
            out[name] = Counters(
                rx_bytes=int(st["rx_bytes"]),
                tx_bytes=int(st["tx_bytes"]),
                rx_packets=int(st["rx_packets"]),
                tx_packets=int(st["tx_packets"]),
            )
    return out


# --------------------------------------------------------------------------
# interfaces of routes and addresses
# --------------------------------------------------------------------------


def _outside_event_loop(fn: Callable[..., T]) -> Callable[..., T]:
    """Run FN on a short-lived thread when called from a running asyncio loop.

    pyroute2's synchronous IPRoute drives an event loop of its own and refuses
    to start inside a running one (``arr serve`` and ``arr agent`` call these
    from theirs). Netlink calls take about a millisecond, so the caller simply
    waits for the thread.
    """

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        return _on_thread(lambda: fn(*args, **kwargs), f"netlink-{fn.__name__}")

    return wrapper



@_outside_event_loop
def route_interface(ns: str | None, dst: str) -> tuple[int, str]:
    """(ifindex, ifname) the kernel would send to DST through."""
    with ipr(ns) as ip:
        found = _call(f"route get {dst}", str(ns), lambda: ip.route("get", dst=dst))
        if not found or found[0].get_attr("RTA_OIF") is None:
            raise NetlinkOpError(f"no route to {dst} in netns {ns!r}")
        index = int(found[0].get_attr("RTA_OIF"))
        return index, str(ip.get_links(index)[0].get_attr("IFLA_IFNAME"))


@_outside_event_loop
def addresses(ns: str | None) -> list[str]:
    """Every IPv4 address configured in NS."""
    with ipr(ns) as ip:
        return [str(m.get_attr("IFA_ADDRESS")) for m in ip.get_addr(family=socket.AF_INET)]


@_outside_event_loop
def address_interface(ns: str | None, address: str) -> tuple[int, str]:
    """(ifindex, ifname) of the interface that carries ADDRESS."""
    with ipr(ns) as ip:
        for msg in ip.get_addr():
            if msg.get_attr("IFA_ADDRESS") == address or msg.get_attr("IFA_LOCAL") == address:
                index = int(msg["index"])
                return index, str(ip.get_links(index)[0].get_attr("IFLA_IFNAME"))
    raise NetlinkOpError(f"no interface has address {address} in netns {ns!r}")


# --------------------------------------------------------------------------
# tc: clsact + cls_bpf (direct action)
# --------------------------------------------------------------------------

TC_PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
ARR_TC_PRIORITY = 0xA77  # our filters' preference: lets us find and replace only ours
_ETH_P_ALL = 0x0003


@dataclass(frozen=True)
class BpfFilter:
    direction: str
    priority: int
    handle: int
    name: str
    prog_id: int | None


def _tc_parent(direction: str) -> int:
    try:
        return TC_PARENT[direction]
    except KeyError:
        raise ValueError(f"direction must be 'ingress' or 'egress', not {direction!r}") from None


@_outside_event_loop
def bpf_attach(ns: str | None, ifname: str, direction: str, prog_fd: int, name: str,
               priority: int = ARR_TC_PRIORITY) -> None:
    """Attach a BPF program as a direct-action classifier on IFNAME.

    Adds the clsact qdisc if missing. An existing filter at PRIORITY is
    replaced in place, so a restart never leaves a moment without one.
    """
    parent = _tc_parent(direction)
    with ipr(ns) as ip:
        index = _index(ip, str(ns), ifname)
        try:
            ip.tc("add", "clsact", index)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST: already there (ours or someone's), keep it
                raise NetlinkOpError(f"adding clsact on {ifname} in netns {ns!r}: {e}") from e
        _call(f"attaching {name} to {ifname} {direction}", str(ns), lambda: ip.tc(
            "replace-filter", "bpf", index, 1, fd=prog_fd, name=name, parent=parent,
            prio=priority, protocol=_ETH_P_ALL, classid=1, direct_action=True))


@_outside_event_loop
def bpf_detach(ns: str | None, ifname: str, direction: str, priority: int = ARR_TC_PRIORITY) -> bool:
    """Remove our filter (only ours) from IFNAME; False if there was none."""
    parent = _tc_parent(direction)
    with ipr(ns) as ip:
        try:
            index = _index(ip, str(ns), ifname)
        except NetlinkOpError:
            return False
        try:
            ip.tc("del-filter", "bpf", index, 1, parent=parent, prio=priority, protocol=_ETH_P_ALL)
        except NetlinkError as e:
            if e.code in (2, 22):  # ENOENT / EINVAL: no such filter
                return False
            raise NetlinkOpError(f"detaching from {ifname} {direction} in netns {ns!r}: {e}") from e
        return True


@_outside_event_loop
def bpf_filters(ns: str | None, ifname: str, direction: str) -> list[BpfFilter]:
    """The bpf classifiers on IFNAME's clsact hook (anyone's)."""
    parent = _tc_parent(direction)
    found = []
    with ipr(ns) as ip:
        index = _index(ip, str(ns), ifname)
        try:
            filters = ip.get_filters(index, parent=parent)
        except NetlinkError:
            return []
        for f in filters:
            if f.get_attr("TCA_KIND") != "bpf" or not f["handle"]:
                continue
            options = f.get_attr("TCA_OPTIONS")
            found.append(BpfFilter(
                direction=direction, priority=f["info"] >> 16, handle=f["handle"],
                name=str(options.get_attr("TCA_BPF_NAME")) if options else "",
                prog_id=options.get_attr("TCA_BPF_ID") if options else None))
    return found


# --------------------------------------------------------------------------
# TCP sockets: sock_diag (NETLINK_SOCK_DIAG), the kernel's own socket table
# --------------------------------------------------------------------------
#
# These block, briefly. Measured on a small VM: a lookup or a destroy takes
# ~40 us with NS None, ~200 us with a namespace name (socket_in_netns starts a
# thread); a dump ~3 us per socket listed (20k: 50-90 ms, nearly all of it
# building the TcpSockets; the kernel's part is ~7 ms). From a busy event
# loop, run a dump of a big table in a thread (asyncio.to_thread), or filter
# it in the kernel with local_port.

_DIAG_RECV_BUFFER = 1 << 16
"""Bytes of a sock_diag reply buffer: netlink caps a dump's datagrams at 32 KiB
(netlink_recvmsg's max_recvmsg_len), an exact lookup's reply is one message.
Kept small because it is zeroed at every allocation: a 1 MiB buffer per
request was a tenth of the router's CPU in a take-back (benchmarks/RESULTS.md);
``SockDiag`` allocates its buffer once."""
_MSG_TRUNC = int(socket.MSG_TRUNC)
"""As a plain int: ``int & socket.MSG_TRUNC`` is an enum operation, about 1 µs."""
_DIAG_TIMEOUT = 5.0  # the kernel answers at once; this only turns a bug into an error
_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO and SO_SNDTIMEO

_DIAG_HINTS = {
    errno.EOPNOTSUPP: " (kernel built without CONFIG_INET_DIAG_DESTROY?)",
    errno.EPERM: " (SOCK_DESTROY needs CAP_NET_ADMIN over the namespace)",
}


class SockDiagError(NetlinkOpError):
    """The kernel refused a sock_diag request; ``errno`` is its error number."""

    def __init__(self, what: str, ns: str | None, err: int):
        name = errno.errorcode.get(err, str(err))
        super().__init__(f"{what} in netns {ns!r}: {name} {os.strerror(err)}{_DIAG_HINTS.get(err, '')}")
        self.errno = err


def _open_sock_diag(ns: str | None) -> socket.socket:
    """A NETLINK_SOCK_DIAG socket in NS (None: the caller's namespace)."""
    args = (socket.AF_NETLINK, socket.SOCK_RAW, inet_diag.NETLINK_SOCK_DIAG)
    if ns is None:
        sock = socket.socket(*args)
    else:
        if not netns_exists(ns):
            raise NetlinkOpError(f"netns {ns!r} does not exist")
        sock = socket_in_netns(ns, *args)
    # The kernel's own timeouts, not Python's: a Python timeout polls before
    # every send and receive (two system calls more per request, and the
    # agents ask at every ended connection); the socket stays blocking, and
    # a reply that never comes fails with EAGAIN after _DIAG_TIMEOUT.
    seconds = int(_DIAG_TIMEOUT)
    timeval = _TIMEVAL.pack(seconds, int((_DIAG_TIMEOUT - seconds) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    return sock


@contextmanager
def _sock_diag(ns: str | None) -> Iterator[socket.socket]:
    with _open_sock_diag(ns) as sock:
        yield sock


def _sock_diag_ask(sock: socket.socket, request: bytes, info: bool = False,
                   buffer: bytearray | None = None, one: bool = False) -> tuple[list[TcpSocket], int | None]:
    """Send REQUEST; read the reply up to its NLMSG_DONE or NLMSG_ERROR
    (ONE: up to its first socket, for an exact lookup, which asks for no
    ACK), into BUFFER (a new one if None).

    Returns the sockets listed and the errno of the end (None: a dump's
    DONE, 0: an ACK). One buffer serves every datagram of a dump.
    """
    sock.send(request)
    if buffer is None:
        buffer = bytearray(_DIAG_RECV_BUFFER)
    view = memoryview(buffer)
    found: list[TcpSocket] = []
    while True:
        size, _, flags, _ = sock.recvmsg_into([buffer])
        if flags & _MSG_TRUNC:
            raise NetlinkOpError(f"sock_diag reply larger than {len(buffer)} bytes")
        sockets, done, err = inet_diag.parse_messages(view[:size], info)
        found += sockets
        if done or err is not None or (one and found):
            return found, err


def _normal(address: Address) -> Address:
    """A valid ADDRESS as the kernel's replies spell it."""
    host, port = address
    return socket.inet_ntoa(socket.inet_pton(socket.AF_INET, host)), port


def _lookup(sock: socket.socket, ns: str | None, local: Address, remote: Address,
            info: bool = False, buffer: bytearray | None = None) -> TcpSocket | None:
    found, err = _sock_diag_ask(sock, inet_diag.lookup_request(local, remote, info=info),  # validates the addresses
                                info, buffer, one=True)
    if err == errno.ENOENT:
        return None
    if err:
        raise SockDiagError(f"looking up TCP {local} -> {remote}", ns, err)
    # No connection has the 4-tuple but a socket listens on LOCAL: the kernel
    # answers with the listener (its lookup is the one incoming packets use).
    wanted = (_normal(local), _normal(remote))
    return next((s for s in found if (s.local, s.remote) == wanted), None)


def tcp_sockets(
    ns: str | None, *, states: Iterable[TcpState] | None = None, local_port: int | None = None
) -> list[TcpSocket]:
    """IPv4 TCP sockets in NS: those in STATES (default: all but LISTEN),
    only those with local port LOCAL_PORT if given (filtered in the kernel).

    Request sockets (a SYN received, the handshake not complete, or completed
    but held by TCP_DEFER_ACCEPT) are listed as SYN_RECV. A dump is not a
    snapshot: a socket that changes state while it runs can be missed.
    """
    mask = inet_diag.CONNECTION_STATES if states is None else inet_diag.state_mask(states)
    if not mask:
        return []
    request = inet_diag.dump_request(mask, local_port)
    with _sock_diag(ns) as sock:
        found, err = _sock_diag_ask(sock, request)
    if err:
        raise SockDiagError("dumping TCP sockets", ns, err)
    return found


def tcp_socket(ns: str | None, local: Address, remote: Address, *, info: bool = False) -> TcpSocket | None:
    """The TCP socket LOCAL -> REMOTE in NS (exact 4-tuple), or None. INFO:
    with what only tcp_info tells (``TcpSocket.notsent``)."""
    with _sock_diag(ns) as sock:
        return _lookup(sock, ns, local, remote, info)


class SockDiag:
    """A NETLINK_SOCK_DIAG socket in NS, and its reply buffer, kept open for
    repeated exact lookups and destroys (the agent looks at a few connections
    many times a second, the router's ForwardCloser at every closed forwarding
    connection: a socket per look cost more than the lookups). After any
    error it is closed and the next call opens a new one, so a half-read
    reply never poisons a later one."""

    def __init__(self, ns: str | None) -> None:
        self.ns = ns
        self._sock: socket.socket | None = None
        self._buffer = bytearray(_DIAG_RECV_BUFFER)  # every reply is read whole before the next request

    def sockets_of(self, pairs: Iterable[tuple[Address, Address]], *, info: bool = False
                   ) -> dict[tuple[Address, Address], TcpSocket | None]:
        """The sockets of exact 4-tuples (local, remote), None where there is
        none; INFO: with what tcp_info tells (``TcpSocket.notsent``)."""
        if self._sock is None:
            self._sock = _open_sock_diag(self.ns)
        found: dict[tuple[Address, Address], TcpSocket | None] = {}
        try:
            for local, remote in pairs:
                found[(local, remote)] = _lookup(self._sock, self.ns, local, remote, info, self._buffer)
        except BaseException:
            self.close()
            raise
        return found

    def destroy(self, local: Address, remote: Address, cookie: int | None = None) -> bool:
        """:func:`destroy_tcp_socket` on this kept socket."""
        if self._sock is None:
            self._sock = _open_sock_diag(self.ns)
        try:
            return _destroy(self._sock, self.ns, local, remote, cookie, self._buffer)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


def tcp_sockets_of(ns: str | None, pairs: Iterable[tuple[Address, Address]]
                   ) -> dict[tuple[Address, Address], TcpSocket | None]:
    """The sockets of exact 4-tuples (local, remote) in NS, None where there
    is none: one netlink socket, one request per 4-tuple. For a few
    connections this is much cheaper than a dump of every socket on a port."""
    diag = SockDiag(ns)
    try:
        return diag.sockets_of(pairs)
    finally:
        diag.close()


def destroy_tcp_socket(ns: str | None, local: Address, remote: Address, *, cookie: int | None = None) -> bool:
    """End the TCP socket LOCAL -> REMOTE in NS (SOCK_DESTROY); False if there is none.

    What the kernel does (tcp_abort) depends on the state. A full socket is
    closed and its owner's next call fails with ECONNABORTED (after a FIN was
    received, recv reports the EOF first; SO_ERROR and send the abort); in
    ESTABLISHED, CLOSE_WAIT, FIN_WAIT1/2 and SYN_RECV a RST goes to the peer
    (not in SYN_SENT, LAST_ACK, CLOSING). A TIME_WAIT socket (also an
    orphan's FIN_WAIT2, listed with inode 0) is removed and a request socket
    dropped, both without sending anything.

    The socket is looked up first and destroyed by its cookie, so a missing
    connection never takes down a listener on LOCAL (see :func:`_lookup`).
    With COOKIE (from :class:`TcpSocket`), only that very socket is destroyed.
    Raises SockDiagError for refusals other than "no such socket" (EPERM
    without CAP_NET_ADMIN, EOPNOTSUPP without CONFIG_INET_DIAG_DESTROY).
    """
    with _sock_diag(ns) as sock:
        return _destroy(sock, ns, local, remote, cookie)


def _destroy(sock: socket.socket, ns: str | None, local: Address, remote: Address, cookie: int | None,
             buffer: bytearray | None = None) -> bool:
    """:func:`destroy_tcp_socket` on SOCK, reading replies into BUFFER."""
    if cookie is None:
        target = _lookup(sock, ns, local, remote, buffer=buffer)
        if target is None:
            return False
        cookie = target.cookie
    _, err = _sock_diag_ask(sock, inet_diag.destroy_request(local, remote, cookie), buffer=buffer)
    if err == errno.ENOENT:  # gone meanwhile, or no longer the socket of COOKIE
        return False
    if err:
        raise SockDiagError(f"destroying TCP {local} -> {remote}", ns, err)
    return True

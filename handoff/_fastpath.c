// SPDX-License-Identifier: Apache-2.0
/*
 * handoff._fastpath: the per-handoff kernel reads and map writes in one call
 * each, instead of one Python-level syscall wrapper per value.
 *
 * This module is an accelerator, not a specification. The specification is
 * the Python in handoff/tcpstate.py (what a socket's state is, how a saved SYN
 * parses) and handoff/libbpf.py (map access); handoff/fastpath.py picks this
 * module when it is built and the Python reference otherwise, and
 * tests/unit/test_fastpath.py + tests/bpf/test_fastpath_maps.py prove that
 * both give the same values and bytes.
 *
 * Linux only; IPv4 addresses only (the handoff translates IPv4 only).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <linux/bpf.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* linux/tcp.h values the libc headers may lack (see handoff/tcpstate.py). */
#define ARR_TCP_REPAIR 19
#define ARR_TCP_REPAIR_QUEUE 20
#define ARR_TCP_QUEUE_SEQ 21
#define ARR_TCP_TIMESTAMP 24
#define ARR_TCP_REPAIR_ON 1
#define ARR_TCP_REPAIR_OFF_NO_WP (-1)
#define ARR_TCP_NO_QUEUE 0
#define ARR_TCP_RECV_QUEUE 1
#define ARR_TCP_SEND_QUEUE 2

/* The leading bytes of struct tcp_info that the handoff reads: state,
 * options, the two wscale nibbles and tcpi_snd_mss (tcpstate.TcpBasics). */
#define TCP_INFO_BASICS_LEN 20
#define TCP_INFO_STATE 0
#define TCP_INFO_OPTIONS 5
#define TCP_INFO_WSCALE 6
#define TCP_INFO_SND_MSS 16

#define DRAIN_CHUNK 65536

/* TCP option kinds (handoff/packet.py). */
#define OPT_EOL 0
#define OPT_NOP 1
#define OPT_MSS 2
#define OPT_WSCALE 3
#define OPT_SACK_PERM 4
#define OPT_TS 8

static PyObject *os_error(void)
{
	return PyErr_SetFromErrno(PyExc_OSError);
}

static int get_u32(int fd, int option, unsigned int *out)
{
	socklen_t len = sizeof(*out);

	return getsockopt(fd, IPPROTO_TCP, option, out, &len);
}

static int set_int(int fd, int option, int value)
{
	return setsockopt(fd, IPPROTO_TCP, option, &value, sizeof(value));
}

static int ioctl_int(int fd, unsigned long request, int *out)
{
	return ioctl(fd, request, out);
}

/* MSG_OOB peek: 1 byte = urgent byte here; EAGAIN = announced, not arrived;
 * EINVAL = none (tcpstate.urgent_pending). */
static int urgent_pending(int fd)
{
	char byte;

	if (recv(fd, &byte, 1, MSG_OOB | MSG_PEEK | MSG_DONTWAIT) > 0)
		return 1;
	return errno == EAGAIN || errno == EWOULDBLOCK;
}

/* (snd_nxt, rcv_nxt) through repair mode, left without a window probe
 * unless the socket was already in repair mode (tcpstate.read_sequence). */
static int read_sequence(int fd, unsigned int *snd_nxt, unsigned int *rcv_nxt)
{
	int was_in_repair = 0;
	socklen_t len = sizeof(was_in_repair);
	int rc = 0;

	if (getsockopt(fd, IPPROTO_TCP, ARR_TCP_REPAIR, &was_in_repair, &len) < 0)
		return -1;
	if (!was_in_repair && set_int(fd, ARR_TCP_REPAIR, ARR_TCP_REPAIR_ON) < 0)
		return -1;
	if (set_int(fd, ARR_TCP_REPAIR_QUEUE, ARR_TCP_SEND_QUEUE) < 0 ||
	    get_u32(fd, ARR_TCP_QUEUE_SEQ, snd_nxt) < 0 ||
	    set_int(fd, ARR_TCP_REPAIR_QUEUE, ARR_TCP_RECV_QUEUE) < 0 ||
	    get_u32(fd, ARR_TCP_QUEUE_SEQ, rcv_nxt) < 0 ||
	    set_int(fd, ARR_TCP_REPAIR_QUEUE, ARR_TCP_NO_QUEUE) < 0)
		rc = -1;
	if (!was_in_repair) {
		int saved = errno;

		if (set_int(fd, ARR_TCP_REPAIR, ARR_TCP_REPAIR_OFF_NO_WP) < 0 && rc == 0)
			return -1;
		errno = saved;
	}
	return rc;
}

static PyObject *address(const struct sockaddr_in *sin)
{
	char text[INET_ADDRSTRLEN];

	if (!inet_ntop(AF_INET, &sin->sin_addr, text, sizeof(text)))
		return os_error();
	return Py_BuildValue("(sH)", text, ntohs(sin->sin_port));
}

PyDoc_STRVAR(socket_state_doc,
"socket_state(fd) -> (local, remote, state, options, wscale, snd_mss, inq, outq,\n"
"                     outq_not_sent, urgent, snd_nxt, rcv_nxt, ts_clock)\n\n"
"Everything tcpstate.snapshot(sock, window_probe=False) reads, in one call.");

static PyObject *socket_state(PyObject *self, PyObject *args)
{
	unsigned char info[TCP_INFO_BASICS_LEN];
	struct sockaddr_in local, remote;
	socklen_t len;
	unsigned int snd_nxt, rcv_nxt, clock, snd_mss;
	int fd, inq, outq, not_sent, urgent;
	PyObject *local_obj, *remote_obj;

	if (!PyArg_ParseTuple(args, "i", &fd))
		return NULL;
	len = sizeof(info);
	memset(info, 0, sizeof(info));
	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &len) < 0)
		return os_error();
	if (ioctl_int(fd, SIOCINQ, &inq) < 0 || ioctl_int(fd, SIOCOUTQ, &outq) < 0 ||
	    ioctl_int(fd, SIOCOUTQNSD, &not_sent) < 0)
		return os_error();
	if (read_sequence(fd, &snd_nxt, &rcv_nxt) < 0)
		return os_error();
	if (get_u32(fd, ARR_TCP_TIMESTAMP, &clock) < 0)
		return os_error();
	len = sizeof(local);
	if (getsockname(fd, (struct sockaddr *)&local, &len) < 0)
		return os_error();
	len = sizeof(remote);
	if (getpeername(fd, (struct sockaddr *)&remote, &len) < 0)
		return os_error();
	if (local.sin_family != AF_INET || remote.sin_family != AF_INET) {
		PyErr_SetString(PyExc_ValueError, "socket_state reads IPv4 sockets only");
		return NULL;
	}
	urgent = urgent_pending(fd);
	memcpy(&snd_mss, info + TCP_INFO_SND_MSS, sizeof(snd_mss));
	local_obj = address(&local);
	if (!local_obj)
		return NULL;
	remote_obj = address(&remote);
	if (!remote_obj) {
		Py_DECREF(local_obj);
		return NULL;
	}
	return Py_BuildValue("(NNBBBIiiiOIII)", local_obj, remote_obj, info[TCP_INFO_STATE],
			     info[TCP_INFO_OPTIONS], info[TCP_INFO_WSCALE], snd_mss, inq, outq,
			     not_sent, urgent ? Py_True : Py_False, snd_nxt, rcv_nxt, clock);
}

PyDoc_STRVAR(eligibility_doc,
"eligibility(fd) -> (state, inq, outq, urgent)\n\n"
"What tcpstate.ineligible(sock) reads: TCP_INFO's state, the queues, a pending urgent byte.");

static PyObject *eligibility(PyObject *self, PyObject *args)
{
	unsigned char info[TCP_INFO_BASICS_LEN];
	socklen_t len = sizeof(info);
	int fd, inq, outq;

	if (!PyArg_ParseTuple(args, "i", &fd))
		return NULL;
	memset(info, 0, sizeof(info));
	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &len) < 0)
		return os_error();
	if (ioctl_int(fd, SIOCINQ, &inq) < 0 || ioctl_int(fd, SIOCOUTQ, &outq) < 0)
		return os_error();
	return Py_BuildValue("(BiiO)", info[TCP_INFO_STATE], inq, outq,
			     urgent_pending(fd) ? Py_True : Py_False);
}

PyDoc_STRVAR(unacked_doc, "unacked(fd) -> int: SIOCOUTQ, bytes written and not yet acknowledged.");

static PyObject *unacked(PyObject *self, PyObject *args)
{
	int fd, outq;

	if (!PyArg_ParseTuple(args, "i", &fd))
		return NULL;
	if (ioctl_int(fd, SIOCOUTQ, &outq) < 0)
		return os_error();
	return PyLong_FromLong(outq);
}

PyDoc_STRVAR(drain_doc,
"drain(fd) -> bytes\n\n"
"Every byte the kernel has queued on the socket, read without blocking\n"
"(engine._drain's reference loop: SIOCINQ, then recv until EAGAIN).");

static PyObject *drain(PyObject *self, PyObject *args)
{
	PyObject *out;
	Py_ssize_t used = 0;
	int fd, inq;

	if (!PyArg_ParseTuple(args, "i", &fd))
		return NULL;
	if (ioctl_int(fd, SIOCINQ, &inq) < 0)
		return os_error();
	if (inq <= 0)
		return PyBytes_FromStringAndSize(NULL, 0);
	out = PyBytes_FromStringAndSize(NULL, inq);
	if (!out)
		return NULL;
	while (used < inq) {
		ssize_t n = recv(fd, PyBytes_AS_STRING(out) + used, (size_t)(inq - used), MSG_DONTWAIT);

		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			Py_DECREF(out);
			return os_error();
		}
		if (n == 0)
			break;
		used += n;
	}
	if (used != inq && _PyBytes_Resize(&out, used) < 0)
		return NULL;
	return out;
}

/* ---------------------------------------------------------- saved SYN */

static PyObject *malformed(const char *what, int at, int value)
{
	PyErr_Format(PyExc_ValueError, "%s (at %d: %d)", what, at, value);
	return NULL;
}

static unsigned int load_be32(const unsigned char *p)
{
	return ((unsigned int)p[0] << 24) | ((unsigned int)p[1] << 16) | ((unsigned int)p[2] << 8) | p[3];
}

PyDoc_STRVAR(parse_syn_doc,
"parse_syn(headers) -> (saddr, daddr, sport, dport, seq, mss, wscale, sack_permitted, tsval, tsecr)\n\n"
"tcpstate.parse_syn's fields as a tuple (None for an absent option); ValueError\n"
"for exactly the inputs the Python reference rejects.");

static PyObject *parse_syn(PyObject *self, PyObject *args)
{
	PyObject *mss, *wscale, *tsval, *tsecr, *result = NULL;
	const unsigned char *h, *tcp, *opts;
	struct in_addr addr;
	char saddr[INET_ADDRSTRLEN], daddr[INET_ADDRSTRLEN];
	Py_buffer buf;
	int ihl, tcp_len, data_offset, n, i, sack = 0;

	if (!PyArg_ParseTuple(args, "y*", &buf))
		return NULL;
	/* Owned references throughout, so that a replacement (Py_XSETREF) and
	 * the exit path release them uniformly. */
	mss = Py_NewRef(Py_None);
	wscale = Py_NewRef(Py_None);
	tsval = Py_NewRef(Py_None);
	tsecr = Py_NewRef(Py_None);
	h = buf.buf;
	if (buf.len < 20) {
		PyErr_SetString(PyExc_ValueError, "shorter than an IPv4 header");
		goto out;
	}
	if (h[0] >> 4 != 4) {
		PyErr_Format(PyExc_ValueError, "IP version %d, only IPv4 is parsed", h[0] >> 4);
		goto out;
	}
	ihl = (h[0] & 0x0F) * 4;
	if (ihl < 20 || ihl + 20 > buf.len) {
		PyErr_Format(PyExc_ValueError, "bad IHL %d for %zd bytes", ihl, buf.len);
		goto out;
	}
	if (h[9] != IPPROTO_TCP) {
		PyErr_Format(PyExc_ValueError, "IP protocol %d is not TCP", h[9]);
		goto out;
	}
	tcp = h + ihl;
	tcp_len = (int)(buf.len - ihl);
	data_offset = (tcp[12] >> 4) * 4;
	if (data_offset < 20 || data_offset > tcp_len) {
		PyErr_Format(PyExc_ValueError, "bad TCP data offset %d for %d bytes", data_offset, tcp_len);
		goto out;
	}
	if (!(tcp[13] & 0x02)) {
		PyErr_SetString(PyExc_ValueError, "not a SYN");
		goto out;
	}
	opts = tcp + 20;
	n = data_offset - 20;
	/* The walk of packet.walk_options, then parse_tcp_options' length checks. */
	for (i = 0; i < n;) {
		int kind = opts[i], length;

		if (kind == OPT_EOL)
			break;
		if (kind == OPT_NOP) {
			i++;
			continue;
		}
		if (i + 1 >= n) {
			malformed("option has no length byte", i, kind);
			goto out;
		}
		length = opts[i + 1];
		if (length < 2 || i + length > n) {
			malformed("option length runs past the option area", i, length);
			goto out;
		}
		if ((kind == OPT_MSS && length != 4) || (kind == OPT_WSCALE && length != 3) ||
		    (kind == OPT_SACK_PERM && length != 2) || (kind == OPT_TS && length != 10)) {
			malformed("known option with a wrong length", i, length);
			goto out;
		}
		/* A later option of a kind replaces an earlier one, as in the reference. */
		if (kind == OPT_MSS) {
			Py_XSETREF(mss, PyLong_FromLong((opts[i + 2] << 8) | opts[i + 3]));
		} else if (kind == OPT_WSCALE) {
			Py_XSETREF(wscale, PyLong_FromLong(opts[i + 2]));
		} else if (kind == OPT_SACK_PERM) {
			sack = 1;
		} else if (kind == OPT_TS) {
			Py_XSETREF(tsval, PyLong_FromUnsignedLong(load_be32(opts + i + 2)));
			Py_XSETREF(tsecr, PyLong_FromUnsignedLong(load_be32(opts + i + 6)));
		}
		if (!mss || !wscale || !tsval || !tsecr)
			goto out;
		i += length;
	}
	memcpy(&addr, h + 12, 4);
	inet_ntop(AF_INET, &addr, saddr, sizeof(saddr));
	memcpy(&addr, h + 16, 4);
	inet_ntop(AF_INET, &addr, daddr, sizeof(daddr));
	result = Py_BuildValue("(ssHHIOOOOO)", saddr, daddr, (tcp[0] << 8) | tcp[1], (tcp[2] << 8) | tcp[3],
			       load_be32(tcp + 4), mss, wscale, sack ? Py_True : Py_False, tsval, tsecr);
out:
	Py_XDECREF(mss);
	Py_XDECREF(wscale);
	Py_XDECREF(tsval);
	Py_XDECREF(tsecr);
	PyBuffer_Release(&buf);
	return result;
}

/* ---------------------------------------------------------- rebuilding */

#define ARR_TCP_REPAIR_OPTIONS 22
#define ARR_TCP_REPAIR_WINDOW 29
#define ARR_TCP_RTO_MAX_MS 44
#define ARR_TCP_RTO_MIN_US 45
#define ARR_TCP_REPAIR_OFF 0
#define REPAIR_STAY (-2) /* restore()'s LEAVE: stay in repair mode */

/* struct tcp_repair_window (linux/tcp.h). */
struct repair_window {
	unsigned int snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup;
};

static int ipv4(const char *text, unsigned short port, struct sockaddr_in *out)
{
	memset(out, 0, sizeof(*out));
	out->sin_family = AF_INET;
	out->sin_port = htons(port);
	if (inet_pton(AF_INET, text, &out->sin_addr) != 1) {
		errno = EINVAL;
		return -1;
	}
	return 0;
}

/* tcpstate.bound_retransmissions: a kernel without the options (before
 * 6.15) leaves the RTO as it is, which is not an error. */
static int bound_retransmissions(int fd, int min_us, int max_ms)
{
	if ((min_us && set_int(fd, ARR_TCP_RTO_MIN_US, min_us) < 0) ||
	    (max_ms && set_int(fd, ARR_TCP_RTO_MAX_MS, max_ms) < 0))
		return (errno == ENOPROTOOPT || errno == EOPNOTSUPP) ? 0 : -1;
	return 0;
}

static int set_queue_seq(int fd, int queue, unsigned int seq)
{
	if (set_int(fd, ARR_TCP_REPAIR_QUEUE, queue) < 0)
		return -1;
	return setsockopt(fd, IPPROTO_TCP, ARR_TCP_QUEUE_SEQ, &seq, sizeof(seq));
}

PyDoc_STRVAR(restore_doc,
"restore(fd, local, remote, snd_nxt, rcv_nxt, mss, repair_options, ts_clock, received,\n"
"        snd_wl1, snd_wnd, rto_min_us, rto_max_ms, leave) -> None\n\n"
"The steps of handoff/rebuild.py's restore_reference on a fresh TCP socket FD:\n"
"repair mode, the RTO bounds, bind, both queues' sequence numbers, the MSS,\n"
"connect, the options, the clock (TS_CLOCK, None without timestamps), RECEIVED\n"
"queued as received, the peer's window; then LEAVE: 1 out of repair mode with\n"
"a window probe, 0 without, -2 staying in it. Raises OSError; nothing has been\n"
"sent then.");

static PyObject *restore(PyObject *self, PyObject *args)
{
	const char *local_ip, *remote_ip;
	unsigned short local_port, remote_port;
	unsigned int snd_nxt, rcv_nxt, snd_wl1, snd_wnd;
	int fd, mss, rto_min_us, rto_max_ms, leave;
	Py_buffer options, received;
	PyObject *ts_clock;
	struct sockaddr_in local, remote;
	struct repair_window window;
	socklen_t window_len = sizeof(window);
	unsigned int clock = 0;
	Py_ssize_t done = 0;
	int rc = -1;

	if (!PyArg_ParseTuple(args, "i(sH)(sH)IIiy*Oy*IIiii", &fd, &local_ip, &local_port, &remote_ip,
			      &remote_port, &snd_nxt, &rcv_nxt, &mss, &options, &ts_clock, &received,
			      &snd_wl1, &snd_wnd, &rto_min_us, &rto_max_ms, &leave))
		return NULL;
	if (ts_clock != Py_None) {
		clock = (unsigned int)PyLong_AsUnsignedLongMask(ts_clock);
		if (PyErr_Occurred())
			goto out;
	}
	if (ipv4(local_ip, local_port, &local) < 0 || ipv4(remote_ip, remote_port, &remote) < 0 ||
	    set_int(fd, ARR_TCP_REPAIR, ARR_TCP_REPAIR_ON) < 0 ||
	    bound_retransmissions(fd, rto_min_us, rto_max_ms) < 0 ||
	    bind(fd, (struct sockaddr *)&local, sizeof(local)) < 0 ||
	    set_queue_seq(fd, ARR_TCP_SEND_QUEUE, snd_nxt) < 0 ||
	    set_queue_seq(fd, ARR_TCP_RECV_QUEUE, rcv_nxt) < 0 ||
	    setsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof(mss)) < 0 ||
	    connect(fd, (struct sockaddr *)&remote, sizeof(remote)) < 0 ||
	    setsockopt(fd, IPPROTO_TCP, ARR_TCP_REPAIR_OPTIONS, options.buf, (socklen_t)options.len) < 0 ||
	    (ts_clock != Py_None && setsockopt(fd, IPPROTO_TCP, ARR_TCP_TIMESTAMP, &clock, sizeof(clock)) < 0))
		goto failed;
	/* Still the receive queue: what is "sent" now is queued as received. */
	while (done < received.len) {
		ssize_t n = send(fd, (const char *)received.buf + done, (size_t)(received.len - done), 0);

		if (n < 0)
			goto failed;
		done += n;
	}
	if (set_int(fd, ARR_TCP_REPAIR_QUEUE, ARR_TCP_NO_QUEUE) < 0 ||
	    getsockopt(fd, IPPROTO_TCP, ARR_TCP_REPAIR_WINDOW, &window, &window_len) < 0)
		goto failed;
	window.snd_wl1 = snd_wl1;
	window.snd_wnd = snd_wnd;
	window.max_window = snd_wnd;
	if (setsockopt(fd, IPPROTO_TCP, ARR_TCP_REPAIR_WINDOW, &window, sizeof(window)) < 0)
		goto failed;
	if (leave != REPAIR_STAY &&
	    set_int(fd, ARR_TCP_REPAIR, leave ? ARR_TCP_REPAIR_OFF : ARR_TCP_REPAIR_OFF_NO_WP) < 0)
		goto failed;
	rc = 0;
	goto out;
failed:
	os_error();
out:
	PyBuffer_Release(&options);
	PyBuffer_Release(&received);
	if (rc < 0)
		return NULL;
	Py_RETURN_NONE;
}

/* ---------------------------------------------------------- BPF maps */

static long bpf(int cmd, union bpf_attr *attr)
{
	return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

PyDoc_STRVAR(map_lookup_doc,
"map_lookup(fd, key, value) -> bool\n\n"
"BPF_MAP_LOOKUP_ELEM into the writable buffer VALUE; False when the key is absent.");

static PyObject *map_lookup(PyObject *self, PyObject *args)
{
	union bpf_attr attr;
	Py_buffer key, value;
	long rc;
	int fd;

	if (!PyArg_ParseTuple(args, "iy*w*", &fd, &key, &value))
		return NULL;
	memset(&attr, 0, sizeof(attr));
	attr.map_fd = fd;
	attr.key = (unsigned long)key.buf;
	attr.value = (unsigned long)value.buf;
	rc = bpf(BPF_MAP_LOOKUP_ELEM, &attr);
	PyBuffer_Release(&key);
	PyBuffer_Release(&value);
	if (rc < 0) {
		if (errno == ENOENT)
			Py_RETURN_FALSE;
		return os_error();
	}
	Py_RETURN_TRUE;
}

PyDoc_STRVAR(map_update_doc, "map_update(fd, key, value, flags) -> None: BPF_MAP_UPDATE_ELEM.");

static PyObject *map_update(PyObject *self, PyObject *args)
{
	union bpf_attr attr;
	Py_buffer key, value;
	unsigned long long flags;
	long rc;
	int fd;

	if (!PyArg_ParseTuple(args, "iy*y*K", &fd, &key, &value, &flags))
		return NULL;
	memset(&attr, 0, sizeof(attr));
	attr.map_fd = fd;
	attr.key = (unsigned long)key.buf;
	attr.value = (unsigned long)value.buf;
	attr.flags = flags;
	rc = bpf(BPF_MAP_UPDATE_ELEM, &attr);
	PyBuffer_Release(&key);
	PyBuffer_Release(&value);
	if (rc < 0)
		return os_error();
	Py_RETURN_NONE;
}

PyDoc_STRVAR(map_delete_doc, "map_delete(fd, key) -> bool: BPF_MAP_DELETE_ELEM; False when absent.");

static PyObject *map_delete(PyObject *self, PyObject *args)
{
	union bpf_attr attr;
	Py_buffer key;
	long rc;
	int fd;

	if (!PyArg_ParseTuple(args, "iy*", &fd, &key))
		return NULL;
	memset(&attr, 0, sizeof(attr));
	attr.map_fd = fd;
	attr.key = (unsigned long)key.buf;
	rc = bpf(BPF_MAP_DELETE_ELEM, &attr);
	PyBuffer_Release(&key);
	if (rc < 0) {
		if (errno == ENOENT)
			Py_RETURN_FALSE;
		return os_error();
	}
	Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
	{"socket_state", socket_state, METH_VARARGS, socket_state_doc},
	{"eligibility", eligibility, METH_VARARGS, eligibility_doc},
	{"unacked", unacked, METH_VARARGS, unacked_doc},
	{"drain", drain, METH_VARARGS, drain_doc},
	{"parse_syn", parse_syn, METH_VARARGS, parse_syn_doc},
	{"restore", restore, METH_VARARGS, restore_doc},
	{"map_lookup", map_lookup, METH_VARARGS, map_lookup_doc},
	{"map_update", map_update, METH_VARARGS, map_update_doc},
	{"map_delete", map_delete, METH_VARARGS, map_delete_doc},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "handoff._fastpath",
	"Compiled kernel reads and map writes of one handoff (see handoff/fastpath.py).", -1, methods,
	NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
	return PyModule_Create(&module);
}

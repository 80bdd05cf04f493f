"""A thin ctypes shell over the system's libbpf (libbpf.so.1).

Only what arr needs: open and load an object with its maps pinned (reusing
pinned maps that already exist, so a restart keeps live connections), find
programs and maps, map element operations, and BPF_PROG_TEST_RUN. Errors are
``BpfError`` with the errno text; nothing here knows about handoff policy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path
from typing import Generic, Iterator, Type, TypeVar

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2

K = TypeVar("K", bound=ctypes.Structure)
V = TypeVar("V", bound=ctypes.Structure)


try:
    from handoff import _fastpath as _fast
except ImportError:  # not built: libbpf serves (handoff/fastpath.py)
    _fast = None  # type: ignore[assignment]

class BpfError(OSError):
    pass


def _load_library() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfError(errno.ENOENT, f"libbpf not found ({exc}); install libbpf1 (apt) ") from None
    c_void_p, c_char_p, c_int, c_uint32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
    signatures = {
        "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
        "bpf_object__load": (c_int, [c_void_p]),
        "bpf_object__close": (None, [c_void_p]),
        "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
        "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
        "bpf_object__next_map": (c_void_p, [c_void_p, c_void_p]),
        "bpf_map__name": (c_char_p, [c_void_p]),
        "bpf_map__set_pin_path": (c_int, [c_void_p, c_char_p]),
        "bpf_map__set_max_entries": (c_int, [c_void_p, c_uint32]),
        "bpf_map__max_entries": (c_uint32, [c_void_p]),
        "bpf_map__type": (c_int, [c_void_p]),
        "bpf_map__key_size": (c_uint32, [c_void_p]),
        "bpf_map__value_size": (c_uint32, [c_void_p]),
        "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, ctypes.POINTER(c_uint32)]),
        "bpf_map__fd": (c_int, [c_void_p]),
        "bpf_program__fd": (c_int, [c_void_p]),
        "bpf_obj_get": (c_int, [c_char_p]),
        "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
        "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_prog_test_run_opts": (c_int, [c_int, c_void_p]),
        "bpf_map_lookup_batch": (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                         ctypes.POINTER(c_uint32), c_void_p]),
        "ring_buffer__new": (c_void_p, [c_int, c_void_p, c_void_p, c_void_p]),
        "ring_buffer__epoll_fd": (c_int, [c_void_p]),
        "ring_buffer__consume": (c_int, [c_void_p]),
        "ring_buffer__free": (None, [c_void_p]),
        "libbpf_set_print": (c_void_p, [c_void_p]),
    }
    for fn, (restype, argtypes) in signatures.items():
        func = getattr(lib, fn)
        func.restype, func.argtypes = restype, argtypes
    del c_uint32
    return lib


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load_library()
    return _lib


def _check(result: int, what: str) -> int:
    if result < 0:
        # libbpf 1.x returns -errno and also sets errno.
        code = -result if result < -1 else ctypes.get_errno() or errno.EINVAL
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return result


class _MapInfo(ctypes.Structure):
    # The head of struct bpf_map_info (the kernel fills what fits).
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32)]


def pinned_map_info(path: str | Path) -> _MapInfo | None:
    """Type, sizes and capacity of the map pinned at PATH (None: no pin)."""
    if not Path(path).exists():
        return None
    fd = _check(lib().bpf_obj_get(str(path).encode()), f"opening pinned map {path}")
    try:
        info = _MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
               f"info of pinned map {path}")
        return info
    finally:
        os.close(fd)


class BpfObject:
    """A loaded BPF object file; its maps pinned under ``pin_dir`` by name.

    ``capacity`` sets the max_entries of the maps it names. A pinned map is
    reused only if it has exactly the object's layout and capacity; otherwise
    loading fails with an error that says which map differs and how."""

    def __init__(self, path: str | Path, pin_dir: str | Path | None = None,
                 capacity: dict[str, int] | None = None) -> None:
        self.path = Path(path)
        self._lib = lib()
        handle = self._lib.bpf_object__open_file(str(self.path).encode(), None)
        if not handle:
            code = ctypes.get_errno() or errno.EINVAL
            raise BpfError(code, f"opening {self.path}: {os.strerror(code)}")
        self._obj: int | None = handle
        try:
            for name, bpf_map in self._maps():
                if capacity and name in capacity:
                    _check(self._lib.bpf_map__set_max_entries(bpf_map, capacity[name]),
                           f"capacity of map {name}")
            if pin_dir is not None:
                Path(pin_dir).mkdir(parents=True, exist_ok=True)
                self._check_pins(Path(pin_dir))
                for name, bpf_map in self._maps():
                    # An existing pin of a compatible map is reused at load: this
                    # is how a restart keeps the connections already handed off.
                    _check(self._lib.bpf_map__set_pin_path(bpf_map, f"{pin_dir}/{name}".encode()),
                           f"pin path of map {name}")
            _check(self._lib.bpf_object__load(handle), f"loading {self.path} (see the verifier log above)")
        except BaseException:
            self.close()
            raise

    def _check_pins(self, pin_dir: Path) -> None:
        """libbpf refuses an incompatible pin with a bare EINVAL: say what differs."""
        for name, bpf_map in self._maps():
            info = pinned_map_info(pin_dir / name)
            if info is None:
                continue
            layout = (self._lib.bpf_map__type(bpf_map), self._lib.bpf_map__key_size(bpf_map),
                      self._lib.bpf_map__value_size(bpf_map))
            if (info.type, info.key_size, info.value_size) != layout:
                raise BpfError(errno.EEXIST, (
                    f"pinned map {pin_dir / name} has another layout (type, key and value size "
                    f"{(info.type, info.key_size, info.value_size)}, this arr needs {layout}): it was "
                    f"made by another version of arr. Stop the process, remove {pin_dir} (its "
                    f"handed-off connections are lost) and start again"))
            want = self._lib.bpf_map__max_entries(bpf_map)
            if info.max_entries != want:
                raise BpfError(errno.EEXIST, (
                    f"pinned map {pin_dir / name} holds at most {info.max_entries} entries, the "
                    f"configuration asks for {want}: keep the old capacity, or stop the process, "
                    f"remove {pin_dir} (its handed-off connections are lost) and start again"))

    def _maps(self) -> Iterator[tuple[str, int]]:
        bpf_map = self._lib.bpf_object__next_map(self._obj, None)
        while bpf_map:
            yield self._lib.bpf_map__name(bpf_map).decode(), bpf_map
            bpf_map = self._lib.bpf_object__next_map(self._obj, bpf_map)

    def program_fd(self, name: str) -> int:
        prog = self._lib.bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise BpfError(errno.ENOENT, f"{self.path} has no program {name!r}")
        return _check(self._lib.bpf_program__fd(prog), f"fd of program {name}")

    def map_fd(self, name: str) -> int:
        bpf_map = self._lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not bpf_map:
            raise BpfError(errno.ENOENT, f"{self.path} has no map {name!r}")
        return _check(self._lib.bpf_map__fd(bpf_map), f"fd of map {name}")

    def close(self) -> None:
        """Close the object. Attached programs and pinned maps stay in the kernel."""
        if self._obj:
            self._lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BpfMap(Generic[K, V]):
    """Typed access to a map; keys and values are ctypes structures."""

    def __init__(self, fd: int, key_type: Type[K], value_type: Type[V], *, owned: bool = False) -> None:
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self._owned = owned
        self._lib = lib()

    @classmethod
    def pinned(cls, path: str | Path, key_type: Type[K], value_type: Type[V]) -> "BpfMap[K, V]":
        fd = lib().bpf_obj_get(str(path).encode())
        _check(fd, f"opening pinned map {path}")
        return cls(fd, key_type, value_type, owned=True)

    # lookup/update/delete run once or more per handoff: through the compiled
    # accelerator (handoff/_fastpath.c, the same BPF_MAP_*_ELEM syscalls)
    # when it is built, else through libbpf. The *_libbpf methods are the
    # reference tests/bpf/test_fastpath_maps.py compares them with.

    def lookup(self, key: K) -> V | None:
        if _fast is None:
            return self.lookup_libbpf(key)
        value = self.value_type()
        try:
            return value if _fast.map_lookup(self.fd, key, value) else None
        except OSError as exc:
            raise BpfError(exc.errno, f"map lookup: {os.strerror(exc.errno)}") from None

    def update(self, key: K, value: V, flags: int = BPF_ANY) -> None:
        if _fast is None:
            return self.update_libbpf(key, value, flags)
        try:
            _fast.map_update(self.fd, key, value, flags)
        except OSError as exc:
            raise BpfError(exc.errno, f"map update: {os.strerror(exc.errno)}") from None

    def delete(self, key: K) -> bool:
        if _fast is None:
            return self.delete_libbpf(key)
        try:
            return _fast.map_delete(self.fd, key)
        except OSError as exc:
            raise BpfError(exc.errno, f"map delete: {os.strerror(exc.errno)}") from None

    def lookup_libbpf(self, key: K) -> V | None:
        value = self.value_type()
        rc = self._lib.bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value))
        if rc < 0:
            if ctypes.get_errno() == errno.ENOENT or rc == -errno.ENOENT:
                return None
            _check(rc, "map lookup")
        return value

    def update_libbpf(self, key: K, value: V, flags: int = BPF_ANY) -> None:
        _check(self._lib.bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags),
               "map update")

    def delete_libbpf(self, key: K) -> bool:
        rc = self._lib.bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if rc < 0:
            if rc == -errno.ENOENT or ctypes.get_errno() == errno.ENOENT:
                return False
            _check(rc, "map delete")
        return True

    def keys(self) -> list[K]:
        keys: list[K] = []
        current: K | None = None
        while True:
            following = self.key_type()
            rc = self._lib.bpf_map_get_next_key(
                self.fd, ctypes.byref(current) if current is not None else None, ctypes.byref(following))
            if rc < 0:
                break
            keys.append(following)
            current = following
        return keys

    def items(self) -> list[tuple[K, V]]:
        """Every entry: in batches of BATCH entries per system call
        (BPF_MAP_LOOKUP_BATCH), else key by key. A walk is not a snapshot:
        entries added or deleted meanwhile may or may not be in it."""
        if self._batch_ok:
            try:
                return self._items_batched()
            except BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                self._batch_ok = False  # a map type or kernel without batches
        found = []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted meanwhile
                found.append((key, value))
        return found

    BATCH = 4096
    _batch_ok = True

    def _items_batched(self) -> list[tuple[K, V]]:
        size = self.BATCH
        keys = (self.key_type * size)()
        values = (self.value_type * size)()
        # The position token: a bucket index for hash maps (u32); room for a key.
        tokens = [ctypes.create_string_buffer(max(8, ctypes.sizeof(self.key_type))) for _ in range(2)]
        found: list[tuple[K, V]] = []
        position = None
        while True:
            count = ctypes.c_uint32(size)
            rc = self._lib.bpf_map_lookup_batch(self.fd, position, tokens[0], keys, values,
                                                ctypes.byref(count), None)
            err = 0
            if rc < 0:
                err = -rc if rc < -1 else ctypes.get_errno()
                if err == errno.ENOSPC and size < (1 << 20):  # a bucket larger than a batch
                    size *= 4
                    keys, values = (self.key_type * size)(), (self.value_type * size)()
                    continue
                if err != errno.ENOENT:
                    raise BpfError(err, f"map lookup batch: {os.strerror(err)}")
            n = count.value
            found += zip(keys[:n], values[:n])  # views of this batch's arrays: no copies
            if err == errno.ENOENT:
                return found
            keys, values = (self.key_type * size)(), (self.value_type * size)()
            tokens.reverse()
            position = tokens[1]

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class RingBuffer:
    """A BPF ring buffer map read with libbpf: ``fileno()`` becomes readable
    when records are waiting (add it to an event loop), ``consume()`` returns
    them, each as a RECORD_TYPE structure, or as one of OTHER_TYPES when the
    record has exactly that type's size (the router's captures share the ring
    with its events)."""

    def __init__(self, map_fd: int, record_type: Type[V], *other_types: type) -> None:
        self.record_type = record_type
        self._records: list[V] = []
        size = ctypes.sizeof(record_type)
        by_size = {ctypes.sizeof(t): t for t in other_types}

        def sample(_ctx: int, data: int, length: int) -> int:
            wider = by_size.get(length)
            if wider is not None:
                self._records.append(wider.from_buffer_copy(ctypes.string_at(data, length)))
            elif length >= size:
                self._records.append(record_type.from_buffer_copy(ctypes.string_at(data, size)))
            return 0

        self._callback = _SAMPLE_FN(sample)  # kept alive as long as the ring buffer
        self._lib = lib()
        handle = self._lib.ring_buffer__new(map_fd, ctypes.cast(self._callback, ctypes.c_void_p), None, None)
        if not handle:
            code = ctypes.get_errno() or errno.EINVAL
            raise BpfError(code, f"ring buffer: {os.strerror(code)}")
        self._rb: int | None = handle
        # Asked once: the reader re-arms on it after every batch.
        self._epoll_fd = _check(self._lib.ring_buffer__epoll_fd(handle), "ring buffer epoll fd")

    def fileno(self) -> int:
        assert self._rb is not None
        return self._epoll_fd

    def consume(self) -> list[V]:
        """Every record waiting, oldest first (never blocks)."""
        if self._rb is None:
            return []
        _check(self._lib.ring_buffer__consume(self._rb), "ring buffer consume")
        records, self._records = self._records, []
        return records

    def close(self) -> None:
        if self._rb:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None


class _TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts (libbpf 1.x, bpf.h)
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


def test_run(prog_fd: int, packet: bytes, *, ctx: bytes | None = None, repeat: int = 1
             ) -> tuple[int, bytes]:
    """Run a program on one packet (BPF_PROG_TEST_RUN): (verdict, packet out)."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    out_size = len(packet) + 256
    data_out = ctypes.create_string_buffer(out_size)
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts))
    opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
    opts.data_size_out = out_size
    opts.repeat = repeat
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
        opts.ctx_in = ctypes.cast(ctx_in, ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval, data_out.raw[:opts.data_size_out]


test_run.__test__ = False  # type: ignore[attr-defined]  # not a pytest test

"""nginx configuration for one test-bed target (unmodified Debian nginx)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NGINX_BIN = "/usr/sbin/nginx"

LOG_FORMAT = (
    '$remote_addr $remote_port [$time_local] "$request" $status $body_bytes_sent '
    '"$http_x_forwarded_for" $request_time $connection $connection_requests'
)
"""Fields split on spaces: the first two and the last two are what the tests
index (``$connection`` and ``$connection_requests`` last); X-Forwarded-For
(quoted, it may hold spaces) in the middle."""


@dataclass(frozen=True)
class NginxPaths:
    root: Path  # this target's own directory inside the cluster workdir

    @property
    def conf(self) -> Path:
        return self.root / "nginx.conf"

    @property
    def pid(self) -> Path:
        return self.root / "nginx.pid"

    @property
    def error_log(self) -> Path:
        return self.root / "error.log"

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    @property
    def temp(self) -> Path:
        return self.root / "tmp"

    @property
    def put_root(self) -> Path:
        """Where a PUT to ``/uploads/NAME`` stores its body: ``uploads/NAME``
        under this directory, the target's own."""
        return self.root / "put"


def _quote(s: str) -> str:
    if any(c in s for c in '"\\$;{}\n'):
        raise ValueError(f"unsafe string for nginx config: {s!r}")
    return f'"{s}"'


def _check(s: str) -> str:
    _quote(s)
    return s


def render_config(paths: NginxPaths, *, label: str, ip: str, port: int, www_root: Path) -> str:
    """nginx.conf text: everything it writes stays under PATHS.root."""
    t = paths.temp
    return f"""\
daemon off;
master_process on;
user root;
worker_processes 1;
# Handed-off connections are the target's own: the benchmark holds 10,000 of
# them idle on two targets, so one worker must be able to keep that many open.
worker_rlimit_nofile 65536;
pid {_quote(str(paths.pid))};
error_log {_quote(str(paths.error_log))} info;

events {{
    worker_connections 16384;
}}

http {{
    types {{ application/octet-stream bin; text/plain txt; }}
    default_type application/octet-stream;

    log_format arr '{LOG_FORMAT}';
    access_log {_quote(str(paths.access_log))} arr;

    client_body_temp_path {_quote(str(t / "body"))};
    proxy_temp_path {_quote(str(t / "proxy"))};
    fastcgi_temp_path {_quote(str(t / "fastcgi"))};
    uwsgi_temp_path {_quote(str(t / "uwsgi"))};
    scgi_temp_path {_quote(str(t / "scgi"))};

    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 10000;
    server_tokens off;

    server {{
        listen {ip}:{port} backlog=4096;
        server_name _;

        location /files/ {{
            root {_quote(str(www_root))};
        }}
        # The same files chunked: SSI drops the length and, with no SSI
        # command in them, passes their bytes unchanged (files.CHUNKED_URL_PREFIX).
        location /chunked/ {{
            alias {_quote(str(www_root / "files") + "/")};
            ssi on;
            ssi_types *;
        }}
        # PUT stores the request's body as a file of this target's own
        # (``Cluster.uploaded``), for tests that check a request body's bytes.
        location /uploads/ {{
            root {_quote(str(paths.put_root))};
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 16m;
        }}
        location = /whoami {{
            default_type text/plain;
            return 200 "{_check(label)}\\n";
        }}
        location = /health {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
    }}
}}
"""


def write_config(paths: NginxPaths, *, label: str, ip: str, port: int, www_root: Path) -> Path:
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.temp.mkdir(exist_ok=True)
    paths.conf.write_text(render_config(paths, label=label, ip=ip, port=port, www_root=www_root))
    return paths.conf


def command(paths: NginxPaths) -> list[str]:
    """argv to run nginx in the foreground with this config (prefix = its dir)."""
    return [NGINX_BIN, "-p", str(paths.root) + "/", "-c", str(paths.conf), "-e", str(paths.error_log)]

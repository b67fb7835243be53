"""Where the stack's MLflow server keeps the registry: the embedded SQLite file (default), a PostgreSQL cluster that
`loraflow up` runs under LORAFLOW_HOME/postgres, or a team's PostgreSQL named by LORAFLOW_MLFLOW_BACKEND_URI.

The choice (`loraflow up --registry postgres`, or LORAFLOW_REGISTRY) is remembered in LORAFLOW_HOME/mlflow/backend,
so a later `up` without it does not silently come back on another, empty registry (basic auth likewise). The local
cluster's binaries come from the `pgserver` wheel (extra `postgres`); it is initialised once (initdb), listens on
127.0.0.1 only (no Unix socket), and its role `loraflow` has a password (scram-sha-256) generated at the first `up`
and kept under run/secrets/ unless LORAFLOW_POSTGRES_PASSWORD is set. Passwords reach MLflow through its environment
(PGPASSWORD, MLFLOW_BACKEND_STORE_URI), never its command line: argv shows in `ps`, in process records and in logs.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from loraflow.errors import LoraflowError

SQLITE, POSTGRES = "sqlite", "postgres"
BACKENDS = (SQLITE, POSTGRES)
REGISTRY_ENV = "LORAFLOW_REGISTRY"
BACKEND_URI_ENV = "LORAFLOW_MLFLOW_BACKEND_URI"
ARTIFACTS_ENV = "LORAFLOW_MLFLOW_ARTIFACTS_DESTINATION"
PASSWORD_ENV = "LORAFLOW_POSTGRES_PASSWORD"
HOST = "127.0.0.1"
ROLE = "loraflow"
DATABASE = "mlflow"
SYSTEM_USER = "pgserver"  # the account the pgserver wheel itself runs PostgreSQL as when started by root


class RegistryBackendError(LoraflowError):
    """The registry backend setting is wrong or PostgreSQL is missing; the message names the setting."""


def remembered_setting(home: Path, name: str, env_name: str, allowed: tuple[str, ...], default: str) -> str:
    """`env_name`, else what this LORAFLOW_HOME used before (LORAFLOW_HOME/mlflow/<name>), else `default`."""
    remembered = home / "mlflow" / name
    choice = os.environ.get(env_name) or (remembered.read_text().strip() if remembered.is_file() else "") or default
    if choice not in allowed:
        raise RegistryBackendError(f"{env_name}={choice!r}: expected one of {', '.join(allowed)}")
    return choice


def remember_setting(home: Path, name: str, value: str) -> None:
    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    (home / "mlflow" / name).write_text(value + "\n")


def choose_backend(home: Path) -> str:
    """LORAFLOW_REGISTRY, else postgres when a backend URI is given, else the backend this LORAFLOW_HOME used
    before, else sqlite."""
    if os.environ.get(BACKEND_URI_ENV) and not os.environ.get(REGISTRY_ENV):
        return POSTGRES
    return remembered_setting(home, "backend", REGISTRY_ENV, BACKENDS, SQLITE)


def external_uri() -> str | None:
    """A team's PostgreSQL (LORAFLOW_MLFLOW_BACKEND_URI); its password in the URI or in PGPASSWORD / ~/.pgpass."""
    uri = os.environ.get(BACKEND_URI_ENV)
    if uri and not uri.startswith(("postgresql://", "postgresql+psycopg2://")):
        raise RegistryBackendError(f"{BACKEND_URI_ENV} must be a postgresql:// URI, got "
                                   f"{shown_uri(uri)!r}")
    return uri or None


def shown_uri(uri: str) -> str:
    """A backend URI fit to print: the password masked."""
    try:
        return make_url(uri).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: show only its scheme
        return uri.split(":", 1)[0] + ":..."


def bin_dir() -> Path:
    """The wheel's PostgreSQL binaries (found, not imported: importing pgserver sets up its own server registry)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RegistryBackendError("the postgres registry needs the `postgres` extra (pgserver, psycopg2-binary): "
                                   "`make venv`, or pip install -e '.[postgres]'")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


@dataclass(frozen=True)
class LocalPostgres:
    """One PostgreSQL cluster: its data directory, its port on 127.0.0.1 and the password of its role."""

    data_dir: Path
    port: int
    password: str

    @property
    def uri(self) -> str:
        """MLflow's backend store URI, without the password (it travels as PGPASSWORD)."""
        return f"postgresql://{ROLE}@{HOST}:{self.port}/{DATABASE}"

    def run_as(self) -> list[str]:
        """PostgreSQL refuses to run as root: then its programs run as the wheel's own account (`prepare`)."""
        return ["setpriv", f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups"] if _root() else []

    def prepare(self) -> None:
        """The data directory (0700); as root also the account, made able to reach the binaries and the directory,
        which it then owns (pgserver prepares the same way)."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _root():
            return
        from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

        account = ensure_user_exists(SYSTEM_USER)
        assert account is not None
        for path in (bin_dir(), self.data_dir):
            ensure_prefix_permissions(path)
        os.chown(self.data_dir, account.pw_uid, account.pw_gid)

    def initialise(self) -> bool:
        """`prepare`, then initdb once (a cluster with PG_VERSION is kept as it is); True when created now."""
        self.prepare()
        if (self.data_dir / "PG_VERSION").is_file():
            return False
        owner = os.stat(self.data_dir)
        # The password reaches initdb through a file only its account reads, deleted at once.
        with tempfile.NamedTemporaryFile("w", dir=self.data_dir.parent, prefix=".pw-") as password_file:
            password_file.write(self.password)
            password_file.flush()
            os.chown(password_file.name, owner.st_uid, owner.st_gid)
            result = subprocess.run(
                [*self.run_as(), str(bin_dir() / "initdb"), "-D", str(self.data_dir), "-U", ROLE,
                 f"--pwfile={password_file.name}", "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
                 "--encoding=UTF8", "--locale=C"],
                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RegistryBackendError(f"initdb {self.data_dir} failed:\n{result.stdout}\n{result.stderr}")
        return True

    def argv(self) -> list[str]:
        """The server in the foreground (its own process group: `down` stops it like every other service)."""
        return [*self.run_as(), str(bin_dir() / "postgres"), "-D", str(self.data_dir), "-h", HOST,
                "-p", str(self.port), "-c", "unix_socket_directories="]

    def connect(self, database: str = "postgres"):  # -> psycopg2 connection
        import psycopg2

        return psycopg2.connect(host=HOST, port=self.port, user=ROLE, password=self.password, dbname=database,
                                connect_timeout=3)

    def ready(self) -> bool:
        import psycopg2

        try:
            self.connect().close()
        except psycopg2.OperationalError:
            return False
        return True

    def ensure_database(self) -> None:
        """The `mlflow` database; MLflow's server creates its tables in it at its first start."""
        connection = self.connect()
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            connection.close()


def _root() -> bool:
    return os.geteuid() == 0


def local_postgres(home: Path, port: int, secret: Callable[[str, Callable[[], str]], str]) -> LocalPostgres:
    """The stack's own cluster; `secret` is Stack.secret (env first, else generated once and kept 0600)."""
    return LocalPostgres(data_dir=home / "postgres" / "data", port=port,
                         password=secret(PASSWORD_ENV, lambda: secrets.token_urlsafe(24)))


def mlflow_store(backend: str, home: Path, local: LocalPostgres | None) -> tuple[list[str], dict[str, str]]:
    """The MLflow server's arguments and environment for its backend store and served artifacts. A PostgreSQL URI
    goes in the environment (MLflow reads MLFLOW_BACKEND_STORE_URI as --backend-store-uri): it may hold a password."""
    artifacts = ["--serve-artifacts", "--artifacts-destination",
                 os.environ.get(ARTIFACTS_ENV) or str(home / "mlflow" / "artifacts")]
    if backend == SQLITE:
        # Same store as the embedded default (loraflow.paths), so both modes share one registry.
        return ["--backend-store-uri", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}", *artifacts], {}
    if (uri := external_uri()) is not None:
        return artifacts, {"MLFLOW_BACKEND_STORE_URI": uri}
    assert local is not None
    return artifacts, {"MLFLOW_BACKEND_STORE_URI": local.uri, "PGPASSWORD": local.password}


def describe_store(argv: list[str], env: dict[str, str]) -> str:
    """One line for `loraflow status`: the store (password masked) and where the served artifacts go."""
    store = env.get("MLFLOW_BACKEND_STORE_URI") or argv[argv.index("--backend-store-uri") + 1]
    return f"{shown_uri(store)}; artifacts {argv[argv.index('--artifacts-destination') + 1]}"

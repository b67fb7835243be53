"""What the local stack is: a Prefect server, a process worker, an MLflow tracking server, the MLflow webhook
receiver and the serving reconciler on 127.0.0.1, their ports, URLs, command lines and the environment a client
needs to reach them (`loraflow up` starts them:
loraflow/localstack/lifecycle.py).

State (Prefect's and MLflow's SQLite databases, MLflow artifacts, logs, process records) lives under
LORAFLOW_HOME, so stopping and starting again keeps schedules, runs and the model registry. The registry may live in
PostgreSQL instead, with basic auth in front of it (loraflow/localstack/postgres.py, mlflow_auth.py).
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet

from loraflow import paths
from loraflow.errors import LoraflowError
from loraflow.localstack import mlflow_auth, postgres
from loraflow.localstack.prefect_api import POOL, WORKER_NAME
from loraflow.localstack.webhook import SECRET_ENV

HOST = "127.0.0.1"
AUTH_ENV, AUTH_MODES = "LORAFLOW_MLFLOW_AUTH", ("none", "basic")
REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"


class StackError(LoraflowError):
    """The stack could not be started, reached or stopped; the message says what to do."""


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int | None  # None: listens nowhere (the worker)
    health_url: str | None  # None: health is checked some other way (the worker registers with its pool)


@dataclass(frozen=True)
class Stack:
    home: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000
    webhook_port: int = 5050  # the MLflow webhook receiver (alias moves -> Prefect events)
    # How often the worker asks for due runs: the bulk of the delay from `deployment run` to flow start.
    worker_poll_seconds: float = 2.0
    extra_env: dict[str, str] = field(default_factory=dict)
    registry: str = postgres.SQLITE  # the MLflow server's backend store: sqlite or postgres (postgres.py)
    postgres_port: int = 5433  # the stack's own PostgreSQL (not 5432: a system PostgreSQL often holds it)
    basic_auth: bool = False  # `mlflow server --app-name basic-auth` (mlflow_auth.py)

    @classmethod
    def from_env(cls) -> Stack:
        home = paths.home()
        return cls(
            home=home,
            prefect_port=int(os.environ.get("LORAFLOW_PREFECT_PORT", "4200")),
            mlflow_port=int(os.environ.get("LORAFLOW_MLFLOW_PORT", "5000")),
            webhook_port=int(os.environ.get("LORAFLOW_WEBHOOK_PORT", "5050")),
            worker_poll_seconds=float(os.environ.get("LORAFLOW_WORKER_POLL_SECONDS", "2")),
            registry=postgres.choose_backend(home),
            postgres_port=int(os.environ.get("LORAFLOW_POSTGRES_PORT", "5433")),
            basic_auth=postgres.remembered_setting(home, "auth", AUTH_ENV, AUTH_MODES, "none") == "basic",
        )

    @property
    def local_postgres(self) -> postgres.LocalPostgres | None:
        """The stack's own PostgreSQL cluster; None when the registry is SQLite or a team's server."""
        if self.registry != postgres.POSTGRES or postgres.external_uri() is not None:
            return None
        return postgres.local_postgres(self.home, self.postgres_port, self.secret)

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_ui_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def webhook_url(self) -> str:
        return f"http://{HOST}:{self.webhook_port}"

    def secret(self, env_name: str, generate: Callable[[], str]) -> str:
        """A secret from the environment, else the one generated at the first `up` and kept (mode 0600) under
        run/secrets/, so restarts keep working (MLflow must decrypt the webhook secrets it stored)."""
        if os.environ.get(env_name):
            return os.environ[env_name]
        file = self.run_dir / "secrets" / env_name
        if not file.is_file():
            file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(generate())
        return file.read_text().strip()

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def client_env(self) -> dict[str, str]:
        """What a process needs to talk to this stack: the CLI, the worker, and the flows it runs."""
        return {
            "LORAFLOW_HOME": str(self.home),
            "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_UI_URL": self.prefect_ui_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "DO_NOT_TRACK": "true",
            **(mlflow_auth.client_credentials(self.secret) if self.basic_auth else {}),
            **self.extra_env,
        }

    def services(self) -> list[Service]:
        python = sys.executable
        env = {**os.environ, **self.client_env()}
        mlflow_dir = self.home / "mlflow"
        store_argv, store_env = self.mlflow_store()
        prefect_db = self.home / "prefect" / "prefect.db"
        prefect_server = Service(
            name="prefect-server",
            argv=[
                python,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                HOST,
                "--port",
                str(self.prefect_port),
                "--analytics-off",
            ],
            env={
                **env,
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_db}",
            },
            port=self.prefect_port,
            health_url=f"{self.prefect_api_url}/health",
        )
        mlflow_server = Service(
            name="mlflow-server",
            argv=[
                python,
                "-m",
                "mlflow",
                "server",
                "--host",
                HOST,
                "--port",
                str(self.mlflow_port),
                "--workers",
                "1",
                *store_argv,
                *(["--app-name", "basic-auth"] if self.basic_auth else []),
            ],
            env={
                **env,
                **store_env,
                **(mlflow_auth.server_env(mlflow_dir, self.secret) if self.basic_auth else {}),
                # Server-side jobs (GenAI scorers, trace rollups) add 8 processes; this stack has no use for them.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                # Webhooks to the receiver on 127.0.0.1 over http, with a stable key for the secrets MLflow stores;
                # the webhook list is cached 10 s (MLflow's default 60 s would delay a fresh registration).
                "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": self.secret(
                    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", lambda: Fernet.generate_key().decode()),
                "MLFLOW_WEBHOOK_CACHE_TTL": "10",
            },
            port=self.mlflow_port,
            health_url=f"{self.mlflow_url}/health",
        )
        worker = Service(
            name="worker",
            argv=[
                python,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                POOL,
                "--type",
                "process",
                "--name",
                WORKER_NAME,
            ],
            env={**env, "PREFECT_WORKER_QUERY_SECONDS": str(self.worker_poll_seconds)},
            port=None,
            health_url=None,
        )
        # Serves every served job as its aliases move: one process, a pass per move (loraflow/serving/follow.py).
        reconciler = Service(
            name="reconciler",
            argv=[python, "-m", "loraflow", "serve", "--follow"],
            env=env,
            port=None,
            health_url=None,
        )
        receiver = Service(
            name="webhook",
            argv=[python, "-m", "uvicorn", "loraflow.localstack.webhook:app_from_env", "--factory", "--host", HOST,
                  "--port", str(self.webhook_port), "--log-level", "warning"],
            env={**env, SECRET_ENV: self.webhook_secret()},
            port=self.webhook_port,
            health_url=f"{self.webhook_url}/health",
        )
        local = self.local_postgres
        database = [Service(name="postgres", argv=local.argv(), env=dict(os.environ), port=self.postgres_port,
                            health_url=None)] if local else []
        return [*database, prefect_server, mlflow_server, receiver, worker, reconciler]

    def mlflow_store(self) -> tuple[list[str], dict[str, str]]:
        return postgres.mlflow_store(self.registry, self.home, self.local_postgres)

    def webhook_secret(self) -> str:
        return self.secret(SECRET_ENV, lambda: secrets.token_urlsafe(32))

    def service(self, name: str) -> Service:
        return next(service for service in self.services() if service.name == name)

    def record_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def flow_run_url(self, flow_run_id: object) -> str:
        return f"{self.prefect_ui_url}/runs/flow-run/{flow_run_id}"

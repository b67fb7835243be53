"""Optional basic auth on the stack's MLflow server (`mlflow server --app-name basic-auth`): every request carries a
user, and only users with EDIT (or MANAGE) on a registered model may move its aliases (docs/registry.md says how an
admin grants it).

MLflow reads its auth settings from the file MLFLOW_AUTH_CONFIG_PATH names; `up` writes one under
LORAFLOW_HOME/mlflow/ (users and permissions in basic_auth.db beside it, new users may READ). The admin's password is
MLFLOW_AUTH_ADMIN_PASSWORD, else one generated at the first `up` and kept under run/secrets/ (0600). Clients pass
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which MLflow's client reads natively; the stack's own processes
(worker, flows, `up` registering its webhook) use those when set, else the admin account.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

ADMIN = "admin"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
# auth_cache_ttl_seconds: a checked password is remembered 60 s, else every request pays a PBKDF2 hash (a register
# step makes ~30 requests). The stack runs one server worker, where password changes through the API apply at once.
CONFIG = """[mlflow]
default_permission = READ
database_uri = sqlite:///{database}
admin_username = {admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
"""


def admin_password(secret: Callable[[str, Callable[[], str]], str]) -> str:
    """`secret` is Stack.secret: the environment first, else generated once and kept."""
    return secret(ADMIN_PASSWORD_ENV, lambda: secrets.token_urlsafe(24))


def server_env(mlflow_dir: Path, secret: Callable[[str, Callable[[], str]], str]) -> dict[str, str]:
    """The auth app's config file (written now) and the admin password MLflow creates the admin with."""
    config = mlflow_dir / "basic_auth.ini"
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(CONFIG.format(database=mlflow_dir / "basic_auth.db", admin=ADMIN))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), ADMIN_PASSWORD_ENV: admin_password(secret),
            # The auth app's CSRF key: it must stay the same across restarts (and across servers sharing a store).
            SECRET_KEY_ENV: secret(SECRET_KEY_ENV, lambda: secrets.token_urlsafe(32))}


def client_credentials(secret: Callable[[str, Callable[[], str]], str]) -> dict[str, str]:
    """Who the stack's own processes are: the user in the environment, else the admin."""
    if os.environ.get(USERNAME_ENV):
        return {USERNAME_ENV: os.environ[USERNAME_ENV], PASSWORD_ENV: os.environ.get(PASSWORD_ENV, "")}
    return {USERNAME_ENV: ADMIN, PASSWORD_ENV: admin_password(secret)}

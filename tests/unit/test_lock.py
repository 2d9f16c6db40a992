"""The lock, ci/constraints.txt: exact pins of every package pyproject.toml needs, within its
bounds, down to the last transitive dependency. ``make venv`` installs with it, so a stale lock
means users get versions the tests never ran with (docs/upgrading.md)."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "ci" / "constraints.txt"


def locked_versions() -> dict[NormalizedName, Version]:
    """Package -> pinned version; an assertion error names any line that is not one exact pin."""
    pins: dict[NormalizedName, Version] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{line!r} is not an exact == pin"
        assert not requirement.marker and not requirement.extras, f"{line!r}: a lock line is a name and a version"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{name} is pinned twice"
        pins[name] = Version(specifiers[0].version)
    return pins


def project_requirements() -> list[Requirement]:
    """The dependencies of pyproject.toml and of all its extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    return [Requirement(line) for line in lines]


def test_the_lock_pins_every_project_requirement_within_its_bounds() -> None:
    pins = locked_versions()
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {LOCK.name}: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )


def test_the_lock_holds_every_dependency_of_what_it_pins() -> None:
    """Walks the installed packages' own requirements (markers evaluated here, extras followed)
    from pyproject's requirements: each one must be pinned too."""
    pins = locked_versions()
    unpinned: dict[str, str] = {}
    walked: set[tuple[NormalizedName, frozenset[str]]] = set()
    todo = [(requirement, "pyproject.toml") for requirement in project_requirements()]
    while todo:
        requirement, wanted_by = todo.pop()
        name = canonicalize_name(requirement.name)
        if name not in pins:
            unpinned[name] = wanted_by
            continue
        if (name, frozenset(requirement.extras)) in walked:
            continue
        walked.add((name, frozenset(requirement.extras)))
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:  # pinned but not installed here: its own needs are unknown
            continue
        for line in requires:
            needed = Requirement(line)
            extras = requirement.extras or {""}
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append((needed, name))
    assert not unpinned, f"needed but not pinned in {LOCK.name} (run make lock): {unpinned}"
    assert len(walked) > len(project_requirements()), "the walk did not follow any installed requirement"

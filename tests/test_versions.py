"""`make install` installs the tested versions: constraints.txt pins every dependency, and each pin satisfies what
pyproject.toml asks for (its dependencies and every extra), so the bounds never promise a version the pins exclude."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def test_constraints_pin_every_requirement_within_its_bounds():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = pins()
    requirements = [Requirement(r) for r in project["dependencies"]]
    extras = [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    for requirement in requirements + extras:
        name = canonicalize_name(requirement.name)
        assert name in pinned or requirement in extras, f"{name} is not pinned in constraints.txt"
        if name in pinned:
            assert requirement.specifier.contains(pinned[name]), f"{requirement} excludes the tested {pinned[name]}"


def test_make_install_uses_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    install = re.search(r"^install:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert re.search(r"pip install -c constraints\.txt -e \"\.\[tests\]\"", install)

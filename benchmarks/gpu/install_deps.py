"""
Install what trl-chord needs and the machine lacks, from wheels in a local folder, with no network.

    python benchmarks/gpu/install_deps.py [WHEEL_DIR]        (default: .whl/ at the repository root)

trl-chord's requirements (setup.cfg's `install_requires`) are checked against what is installed. If every one is met,
nothing is installed. Otherwise pip installs the unmet ones from WHEEL_DIR alone (`--no-index --find-links`): it takes
a wheel from the folder only where no installed version meets a requirement, its dependencies' included. If pip cannot
resolve that (an installed package outside the range a carried wheel asks for, with no wheel to replace it), every
carried wheel whose project is not installed at all is installed without its dependencies (`--no-deps`), and the run
says so. Then trl and datasets must import, or the exit status is 1.

The folder is filled on a machine with network by `bash benchmarks/gpu/fetch_wheels.sh` (the wheels that
benchmarks/gpu/wheels.txt lists).
"""

import configparser
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import parse_wheel_filename


REPOSITORY = Path(__file__).resolve().parents[2]


def package_requirements(setup_cfg: Path = REPOSITORY / "setup.cfg") -> list[Requirement]:
    """trl-chord's `install_requires`."""
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    lines = parser["options"]["install_requires"].splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip()]


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def unmet(requirements: list[Requirement], installed: Callable[[str], str | None] = installed_version) -> list:
    """The requirements no installed distribution meets (a local version such as `2.11.0+cu130` counts as its own)."""
    missing = []
    for requirement in requirements:
        found = installed(requirement.name)
        if found is None or not requirement.specifier.contains(found, prereleases=True):
            missing.append(requirement)
    return missing


def carried_wheels(folder: Path) -> dict[str, Path]:
    """The newest wheel of each project in `folder`, by canonical project name."""
    newest = {}
    for path in sorted(folder.glob("*.whl")):
        name, wheel_version, _, _ = parse_wheel_filename(path.name)
        if name not in newest or wheel_version > newest[name][0]:
            newest[name] = (wheel_version, path)
    return {name: path for name, (_, path) in newest.items()}


def pip(*args: str) -> int:
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-cache-dir", "--disable-pip-version-check"]
    print("$", " ".join(command + list(args)), flush=True)
    return subprocess.run(command + list(args)).returncode


def install(missing: list[Requirement], folder: Path) -> None:
    if pip("--find-links", str(folder), *map(str, missing)) == 0:
        return
    absent = {name: path for name, path in carried_wheels(folder).items() if installed_version(name) is None}
    print(
        "pip could not resolve the requirements against what is installed and the carried wheels (above); installing "
        f"the carried wheels of projects not installed at all, without their dependencies: {sorted(absent)}",
        flush=True,
    )
    if absent:
        pip("--no-deps", *map(str, absent.values()))


def imports_work() -> bool:
    """Whether trl (its GRPOTrainer) and datasets import, in a fresh interpreter (this one cached the failures)."""
    check = "import datasets, trl; from trl import GRPOTrainer; print('imported trl', trl.__version__, 'and datasets')"
    return subprocess.run([sys.executable, "-c", check]).returncode == 0


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else REPOSITORY / ".whl"
    requirements = package_requirements()
    missing = unmet(requirements)
    if not missing:
        print("Every requirement of trl-chord is installed: nothing to install.")
    elif not carried_wheels(folder):
        print(
            f"trl-chord needs {', '.join(map(str, missing))}, which are not installed, and {folder} holds no wheels. "
            "Fill it on a machine with network with `bash benchmarks/gpu/fetch_wheels.sh` and carry it along.",
            file=sys.stderr,
        )
        return 1
    else:
        print(f"Not installed or out of range: {', '.join(map(str, missing))}; installing from {folder}.", flush=True)
        install(missing, folder)
    still_missing = unmet(requirements)
    for requirement in requirements:
        print(f"  {requirement.name} {installed_version(requirement.name)} (needs {requirement.specifier})")
    if still_missing:
        print(f"Still out of range (the run goes on): {', '.join(map(str, still_missing))}", flush=True)
    return 0 if imports_work() else 1


if __name__ == "__main__":
    sys.exit(main())

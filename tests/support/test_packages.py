"""Debian packages that only the test suite needs, installed by ``make test`` when run as root.

    python tests/support/test_packages.py install [GROUP ...]    # default: every group

Groups: ``slurm`` (a local Slurm cluster for the tests of ``train.launcher: slurm``), ``browser``
(Debian's chromium, driven by Playwright in the UI smoke tests) and ``postgres`` (the database of the server stack,
``prefixflow stack up``). ``make demo`` installs none of them.
A group whose binaries are already present is skipped; ``apt-get update`` runs only when an install
fails on a stale package list.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "slurm": {"packages": ("slurmctld", "slurmd", "slurm-client", "munge"),
              "binaries": ("munged", "slurmctld", "slurmd", "srun", "scontrol", "squeue", "scancel", "sinfo")},
    "browser": {"packages": ("chromium",), "binaries": ("chromium",)},
    "postgres": {"packages": ("postgresql",), "binaries": ("initdb", "postgres")},
}


class PackagesMissing(RuntimeError):
    """Packages are missing and cannot be installed by this user (the message says what to run)."""


def binary(name: str) -> str | None:
    """Path of a system binary (PATH, then /usr/sbin where Debian puts daemons, then PostgreSQL's versioned
    /usr/lib/postgresql/*/bin), or None."""
    candidates = [shutil.which(name), str(Path("/usr/sbin", name)),
                  *map(str, sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}")))]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def missing(group: str) -> list[str]:
    return [b for b in GROUPS[group]["binaries"] if binary(b) is None]


def install(groups: list[str] | None = None) -> list[str]:
    """apt-get install the packages of ``groups`` (default all) whose binaries are missing; returns
    the packages installed. Needs root; otherwise raises with the command to run."""
    todo = [p for g in (groups or list(GROUPS)) if missing(g) for p in GROUPS[g]["packages"]]
    if not todo:
        return []
    if os.geteuid() != 0:
        raise PackagesMissing(f"missing system packages {', '.join(todo)}; as root run "
                              f"`apt-get install -y --no-install-recommends {' '.join(todo)}`")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *todo]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    return todo


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "install" or any(g not in GROUPS for g in args[1:]):
        print(f"usage: python tests/support/test_packages.py install [{' | '.join(GROUPS)} ...]", file=sys.stderr)
        return 2
    try:
        done = install(args[1:] or None)
    except (PackagesMissing, subprocess.SubprocessError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"installed {', '.join(done)}" if done else "test packages already installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

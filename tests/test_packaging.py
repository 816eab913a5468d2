"""The installed distribution claims two import names, ``prefixflow`` and ``prefix_core``, and nothing
generic: a user's project with its own ``flows`` and ``tasks`` packages imports both them and ours.

The wheel is built from this checkout and installed (without dependencies) into a new virtual environment
that borrows the dependencies of the test environment through a path entry."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

USER_CHECK = """
import flows, tasks
assert flows.OWNER == tasks.OWNER == "user", (flows.__file__, tasks.__file__)
import prefix_core, prefixflow, prefixflow.cli, prefixflow.tasks.train_prefix, prefixflow.launch.train_job
import prefixflow.infra.stack
from prefixflow.launch.command import ACCELERATE_CONFIGS, DEEPSPEED_CONFIGS
from prefixflow.launch.k8s_render import K8S_DIR
site = {site!r}
for module in (prefixflow, prefixflow.flows, prefixflow.tasks, prefixflow.infra, prefix_core):
    assert module.__file__.startswith(site), module.__file__
for path in [*ACCELERATE_CONFIGS.values(), *DEEPSPEED_CONFIGS.values(), K8S_DIR / "multinode-train.yaml"]:
    assert path.is_file() and str(path).startswith(site), path
print("ok")
"""


def test_wheel_installs_beside_a_project_with_its_own_flows_and_tasks(tmp_path):
    src, dist = tmp_path / "src", tmp_path / "dist"  # built from a copy: setuptools writes build/ into the tree
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    for name in listed:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True, timeout=600)
    [wheel] = dist.glob("prefixflow-*.whl")
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if not name.split("/")[0].endswith(
        ".dist-info")}
    assert top == {"prefixflow", "prefix_core"}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # The dependencies (torch, prefect, ...) of the test environment; a plain path entry, so that
    # environment's own editable prefixflow is not picked up.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    project = tmp_path / "project"
    for name in ("flows", "tasks"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text('OWNER = "user"\n')
    out = subprocess.run([str(python), "-c", USER_CHECK.format(site=site)], cwd=project, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
    cli = subprocess.run([str(venv / "bin" / "prefixflow"), "--help"], cwd=project, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0 and "demo" in cli.stdout, cli.stdout + cli.stderr


def test_prefix_core_names_load_on_first_use():
    import prefix_core

    assert set(prefix_core.__all__) == set(prefix_core._WHERE)
    for name in prefix_core.__all__:
        assert getattr(prefix_core, name) is getattr(__import__(f"prefix_core.{prefix_core._WHERE[name]}",
                                                                fromlist=[name]), name)

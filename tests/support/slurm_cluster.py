"""A real Slurm cluster on this host, for development and the tests of ``train.launcher: slurm``.

``munged`` (its own key and socket), ``slurmctld`` and ``nodes`` ``slurmd`` daemons named
``node0..nodeN-1`` (each on its own port of 127.0.0.1), all in the foreground of their own process
groups, configured and logged under one state folder; nothing under /etc is used. ``SLURM_CONF``
(from :meth:`SlurmCluster.env`) points ``srun``/``squeue``/``scancel`` at it.

    PYTHONPATH=tests python -m support.slurm_cluster install   # apt-get the Debian packages (as root)
    PYTHONPATH=tests python -m support.slurm_cluster up STATE_DIR [--nodes 2]   # prints `export SLURM_CONF=...`
    PYTHONPATH=tests python -m support.slurm_cluster down STATE_DIR

Tasks run as the user who started the cluster (``SlurmUser`` = ``SlurmdUser`` = that user), in the
submitting shell's environment. It is a test bed, not a production setup: no accounting, no cgroups.
"""

from __future__ import annotations

import argparse
import getpass
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefixflow import processes
from support import test_packages
from support.harness import wait_until

PACKAGES = test_packages.GROUPS["slurm"]["packages"]
BINARIES = test_packages.GROUPS["slurm"]["binaries"]


class SlurmClusterError(RuntimeError):
    """The local cluster could not be started (the message says why and what to do)."""


def missing_binaries() -> list[str]:
    return test_packages.missing("slurm")


def _binary(name: str) -> str:
    return test_packages.binary(name) or str(Path("/usr/sbin", name))


def install() -> None:
    """Install Slurm and munge from Debian/Ubuntu packages (needs root); no-op when already there."""
    try:
        test_packages.install(["slurm"])
    except test_packages.PackagesMissing as err:
        raise SlurmClusterError(str(err)) from None


def _free_port() -> int:
    from prefixflow.launch.command import free_port

    return free_port("127.0.0.1")


@dataclass
class SlurmCluster:
    state_dir: Path
    nodes: int = 2
    cpus_per_node: int = 2

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self._procs: dict[str, subprocess.Popen] = {}  # the daemons this process started

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _pid(self, name: str) -> Path:
        return self.state_dir / "run" / f"{name}.pid"

    def _write_config(self) -> None:
        s, user = self.state_dir, getpass.getuser()
        for sub in ("run", "log", "ctld", "munge"):
            (s / sub).mkdir(parents=True, exist_ok=True)
        (s / "munge").chmod(0o700)
        key = s / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o600)
        ports = [_free_port() for _ in range(self.nodes + 1)]
        nodes = "\n".join(f"NodeName=node{i} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports[i + 1]} "
                          f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN" for i in range(self.nodes))
        self.conf.write_text(f"""\
ClusterName=prefixflow-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={s}/munge/munge.sock
StateSaveLocation={s}/ctld
SlurmdSpoolDir={s}/run/spool-%n
SlurmctldPidFile={s}/run/slurmctld-daemon.pid
SlurmdPidFile={s}/run/slurmd-%n-daemon.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=10
{nodes}
PartitionName=batch Nodes=node[0-{self.nodes - 1}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _start(self, name: str, argv: list[str]) -> None:
        with open(self.state_dir / "log" / f"{name}.out", "ab") as log:
            proc = processes.start(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env()})
        self._procs[name] = proc
        self._pid(name).write_text(str(proc.pid))

    def _idle_nodes(self) -> int:
        out = subprocess.run([_binary("sinfo"), "--noheader", "--Node", "--format=%N %t"], capture_output=True,
                             text=True, env={**os.environ, **self.env()}, timeout=30)
        return sum(1 for line in out.stdout.splitlines() if line.split()[-1:] == ["idle"])

    def up(self, timeout_s: float = 90) -> dict[str, str]:
        """Start the daemons and wait until every node is idle; returns the client environment."""
        if missing_binaries():
            raise SlurmClusterError(f"Slurm is not installed (missing {', '.join(missing_binaries())}); run "
                                    "`PYTHONPATH=tests python -m support.slurm_cluster install` as root")
        self.down()
        self._write_config()
        m = self.state_dir / "munge"
        self._start("munged", [_binary("munged"), "--foreground", "--force", f"--socket={m}/munge.sock",
                               f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                               f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        deadline = time.monotonic() + timeout_s
        self._wait_for(lambda: (m / "munge.sock").exists(), ["munged"], deadline, 0.1)
        self._start("slurmctld", [_binary("slurmctld"), "-D", "-f", str(self.conf)])
        for i in range(self.nodes):
            self._start(f"slurmd-node{i}", [_binary("slurmd"), "-D", "-f", str(self.conf), "-N", f"node{i}"])
        self._wait_for(lambda: self._idle_nodes() >= self.nodes,
                       ["munged", "slurmctld", *(f"slurmd-node{i}" for i in range(self.nodes))], deadline, 0.5)
        return self.env()

    def _wait_for(self, ready, names: list[str], deadline: float, interval: float) -> None:
        """Until ``ready()``; if one of the daemons ``names`` exits first, or ``deadline`` passes, stop the cluster
        and raise SlurmClusterError with that daemon's log."""
        def check() -> bool:
            for name in names:
                if self._exited(name):
                    self._fail(name, "exited")
            return ready()

        try:
            wait_until(check, max(0.0, deadline - time.monotonic()), interval)
        except AssertionError:
            self._fail(names[-1], "did not get ready")

    def _exited(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc.poll() is not None if proc is not None else not processes.alive(int(self._pid(name).read_text()))

    def _fail(self, name: str, what: str) -> None:
        log = self.state_dir / "log" / f"{name}.out"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        self.down()
        raise SlurmClusterError(f"{name} {what}; see {log} and {self.state_dir / 'log'}:\n{tail}")

    def down(self, grace_s: float = 15) -> None:
        """Cancel every job, then stop the daemons (slurmd, slurmctld, munged)."""
        if self.conf.exists() and self._pid("slurmctld").exists():
            subprocess.run([_binary("scancel"), "--full", f"--user={getpass.getuser()}"], capture_output=True,
                           env={**os.environ, **self.env()}, timeout=30)
        names = [p.stem for p in sorted((self.state_dir / "run").glob("slurmd-node*.pid"))] + ["slurmctld", "munged"]
        for name in names:
            pid_file = self._pid(name)
            if not pid_file.exists():
                continue
            processes.stop_group(int(pid_file.read_text()), grace_s, self._procs.pop(name, None))
            pid_file.unlink(missing_ok=True)


@contextmanager
def running_cluster(state_dir: Path, nodes: int = 2):
    """A started cluster for the duration of the block; yields it (``.env()`` for the clients)."""
    cluster = SlurmCluster(state_dir, nodes=nodes)
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m support.slurm_cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="apt-get install Slurm and munge (as root)")
    for name in ("up", "down"):
        p = sub.add_parser(name)
        p.add_argument("state_dir", type=Path)
        if name == "up":
            p.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            install()
        elif args.command == "up":
            env = SlurmCluster(args.state_dir, nodes=args.nodes).up()
            print("\n".join(f"export {k}={v}" for k, v in env.items()))
        else:
            SlurmCluster(args.state_dir).down()
    except (SlurmClusterError, subprocess.SubprocessError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

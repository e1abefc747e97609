"""A real single-node SLURM for tests: Debian's ``slurm-wlm`` and ``munge`` (installed with apt when
missing), configured in a private directory (free ports, state and logs; munge's own socket in a
private /tmp directory), the daemons started here and stopped by PID.

    from slurm_local import LocalSlurm       # tests/ is on sys.path under pytest
    with LocalSlurm(workdir) as slurm:
        job = slurm.sbatch(["script.sbatch", "arg"], output="job.out")
        slurm.wait(lambda: slurm.job(job).get("JobState") == "COMPLETED", 300)

Anything that stops the cluster from starting raises (a test that needs it fails; it never skips).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Callable

# a requeued job waits this long before it may start again (slurmd refuses it while the killed
# start's credential is still remembered as revoked); SLURM's default is 120 s
CRED_EXPIRE_S = 10

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "sinfo", "scancel")
SBIN = "/usr/sbin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    """apt-get install slurm-wlm and munge when a binary is missing (needs root, as in CI)."""
    missing = [d for d in DAEMONS if not (shutil.which(d) or os.path.exists(os.path.join(SBIN, d)))]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def _node_line() -> str:
    out = subprocess.run([os.path.join(SBIN, "slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    memory = int(int(fields["RealMemory"]) * 0.9)
    return (f"NodeName={fields['NodeName']} CPUs={fields['CPUs']} Boards={fields['Boards']} "
            f"SocketsPerBoard={fields['SocketsPerBoard']} CoresPerSocket={fields['CoresPerSocket']} "
            f"ThreadsPerCore={fields['ThreadsPerCore']} RealMemory={memory} State=UNKNOWN")


class LocalSlurm:
    def __init__(self, workdir: str):
        self.dir = os.path.abspath(workdir)
        self.procs: list[subprocess.Popen] = []
        self.munge_dir: str | None = None
        self.env = dict(os.environ)

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurm":
        ensure_installed()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        # munged wants its socket's directory and every one above it searchable by all
        self.munge_dir = tempfile.mkdtemp(prefix="adm-munge-", dir="/tmp")
        os.chmod(self.munge_dir, 0o755)
        shutil.chown(self.munge_dir, "munge", "munge")
        m = self.munge_dir
        socket_path = os.path.join(m, "munge.socket")
        host = socket.gethostname().split(".")[0]
        node = _node_line()
        partition = f"PartitionName=debug Nodes={node.split()[0].split('=')[1]} Default=YES MaxTime=INFINITE State=UP"
        conf = os.path.join(d, "slurm.conf")
        with open(conf, "w") as f:
            f.write("\n".join([
                # job ids (hence the trainer's default port 15000 + id) away from any other cluster's
                "ClusterName=adm-test", f"FirstJobId={random.randint(1000, 9000)}", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
                f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
                "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={socket_path},cred_expire={CRED_EXPIRE_S}",
                f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
                f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
                f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd.log",
                "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
                "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
                "JobRequeue=1", "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt",
                f"JobCompLoc={d}/log/jobcomp.txt", "KillWait=5", "InactiveLimit=0", "MinJobAge=300",
                node, partition, "",
            ]))
        self.env["SLURM_CONF"] = conf
        munged = ["runuser", "-u", "munge", "--", os.path.join(SBIN, "munged"), "-F", f"--socket={socket_path}",
                  f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"]
        self._spawn(munged, "munged")
        self._wait_for(lambda: os.path.exists(socket_path), 20, "munged socket")
        self._spawn([os.path.join(SBIN, "slurmctld"), "-D", "-f", conf], "slurmctld")
        self._spawn([os.path.join(SBIN, "slurmd"), "-D", "-f", conf], "slurmd")
        self._wait_for(lambda: self.node_state() == "idle", 60, "an idle node")

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(os.path.join(self.dir, "log", f"{name}.out"), "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        log.close()

    def _wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}) while waiting for {what}; "
                                       f"logs in {self.dir}/log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout:.0f} s; logs in {self.dir}/log")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job of this private cluster (job steps outlive slurmd), then stop slurmd,
        slurmctld and munged, each by its PID (TERM, then KILL after 15 s)."""
        if len(self.procs) == 3 and all(p.poll() is None for p in self.procs):
            self._run(["scancel", "--signal=KILL", "--full", "--user=root"])
            deadline = time.monotonic() + 60
            while self._run(["squeue", "-h"]).stdout.strip() and time.monotonic() < deadline:
                self._run(["scancel", "--user=root"])
                time.sleep(1)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []
        if self.munge_dir:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None

    # -- client commands -----------------------------------------------------------------------
    def _run(self, cmd: list[str], check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, args: list[str], cwd: str, env: dict | None = None) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def scontrol(self, *args: str) -> str:
        return self._run(["scontrol", *args], check=True).stdout

    def scancel(self, *args: str) -> None:
        self._run(["scancel", *args], check=True)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode...)."""
        text = self.scontrol("show", "job", "-o", job_id)
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def node_state(self) -> str:
        return self._run(["sinfo", "-h", "-o", "%T"]).stdout.strip()

    def wait(self, condition: Callable[[], bool], timeout: float, what: str = "the job") -> None:
        self._wait_for(condition, timeout, what)

"""A one-node SLURM for the `slurm` test tier: slurmctld + slurmd (auth/none, no munge, no accounting) in a
scratch folder on free ports, torn down by PID. Facts it relies on: ../shared/CLUSTER.md (SLURM 22.05, Debian 12).

    def test_x(slurm_cluster):
        job = slurm_cluster.sbatch("--output=out.log", "script.sbatch", "arg")
        assert slurm_cluster.wait(job, timeout=120) == "COMPLETED"

Where SLURM cannot be started (not installed, not root, the daemons do not come up) the tier is skipped with the
reason; with SLURM_TESTS=required in the environment (.ci/run sets it) that is a failure instead.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CRED_EXPIRE = 5  # s; SLURM's default is 120: slurmd refuses ("Job credential revoked") an earlier restart


def _conf(root: Path, host: str) -> str:
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return "\n".join([
        "ClusterName=test", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/none", "CredType=cred/none",
        f"AuthInfo=cred_expire={CRED_EXPIRE}",  # a requeued job may start again this long after its last run
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        "MinJobAge=3600",  # finished jobs stay visible to scontrol (there is no accounting to ask)
        "KillWait=10",  # seconds from SIGTERM to SIGKILL when a job is cancelled or requeued
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory={int(total_mb * 0.9)} State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])


class SlurmCluster:
    """The daemons' processes and the client side: `env` (os.environ + SLURM_CONF) for sbatch/squeue/scontrol."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "slurm.conf"
        self.conf.write_text(_conf(self.root, self.host))
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons = []

    def start(self, timeout: float = 30.0) -> None:
        for cmd in (["slurmctld", "-D", "-c", "-f", str(self.conf)], ["slurmd", "-D", "-f", str(self.conf)]):
            log = open(self.root / f"{cmd[0]}.out", "wb")
            self.daemons.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True))
        deadline = time.monotonic() + timeout
        while self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() != "idle":
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SLURM did not come up ({', '.join(dead) or 'timeout'}): {self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.daemons:  # by PID: only the daemons started here
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.daemons:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.daemons = []

    def logs(self, chars: int = 2000) -> str:
        return " | ".join(f"{p.name}: {p.read_text()[-chars:]}" for p in sorted(self.root.glob("slurm*.log")))

    def run(self, *cmd, check=True) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, *args, cwd=None) -> int:
        """Submit (sbatch arguments, the script and its arguments); returns the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], env=self.env, cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(map(str, args))} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def state(self, job_id: int) -> str:
        return self.job(job_id)["JobState"]

    def wait(self, job_id: int, timeout: float = 300.0, states=FINAL) -> str:
        """Poll until the job is in one of `states` (default: finished); returns that state."""
        deadline = time.monotonic() + timeout
        while (state := self.state(job_id)) not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s: {self.job(job_id)}")
            time.sleep(0.5)
        return state

    def start_now(self, job_id: int, timeout: float = 60.0) -> None:
        """A requeued job waits about 2 minutes before it may start again: make it eligible as soon as the node
        has finished with its previous run and the run's credential has expired (AuthInfo=cred_expire: started
        earlier, slurmd kills it as "Job credential revoked" and the job ends FAILED)."""
        deadline = time.monotonic() + timeout
        while (node := self.run("sinfo", "-h", "-o", "%t").stdout.strip()) != "idle":
            if time.monotonic() > deadline:
                raise TimeoutError(f"node still {node} after {timeout} s")
            time.sleep(0.2)
        time.sleep(CRED_EXPIRE + 1)
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")


def _cannot_start() -> str | None:
    missing = [cmd for cmd in ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo") if shutil.which(cmd) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} not found; Debian: apt-get install "
                f"slurmctld slurmd slurm-client)")
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs (the tier runs as root, as in CI)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM for the session (see SlurmCluster); skipped, with the reason, where it cannot be."""
    reason = _cannot_start()
    cluster = None
    if reason is None:
        cluster = SlurmCluster(tempfile.mkdtemp(prefix="slurm-test-"))
        try:
            cluster.start()
        except RuntimeError as err:
            reason, cluster = str(err), None
    if reason is not None:
        if os.environ.get("SLURM_TESTS") == "required":
            pytest.fail(f"SLURM_TESTS=required, but {reason}")
        pytest.skip(reason)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)

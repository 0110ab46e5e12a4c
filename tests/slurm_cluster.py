"""A throwaway single-node SLURM cluster on loopback, for tests that need a real scheduler.

``slurm_cluster(workdir)`` starts a private ``munged`` plus ``slurmctld`` and ``slurmd`` (Slurm 22.05 as
packaged by Debian), with every socket, key, port, state, spool, pid and log file under ``workdir``, so it
never touches a system munge/Slurm nor another test session. It yields a :class:`SlurmCluster` once the
node reports idle and, on exit, cancels the remaining jobs and stops all three daemons.

Client commands find the cluster through ``SLURM_CONF``: run them with ``cluster.env`` (or ``cluster.run``).
The munge socket reaches clients through ``AuthInfo=socket=...`` in that same ``slurm.conf``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
FINAL_STATES = {"", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}  # "": purged from slurmctld (MinJobAge after the end)


@dataclass
class SlurmCluster:
    """A running cluster: ``env`` for subprocesses, ``conf`` (slurm.conf), ``logs`` (daemon name -> log file)."""

    workdir: Path
    conf: Path
    node: str
    env: dict[str, str]
    logs: dict[str, Path]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command (e.g. ``run("sbatch", "--wrap", "true")``) against this cluster; text output captured."""
        proc = subprocess.run(cmd, check=False, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def job_state(self, job_id: str) -> str:
        """The job's state as ``scontrol`` reports it (e.g. PENDING, RUNNING, COMPLETED), or "" once it is purged."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")

    def wait_job(self, job_id: str, timeout: float = 60) -> str:
        """Wait until the job has ended for good (a requeued job is not); returns its final state."""
        deadline = time.monotonic() + timeout
        while (state := self.job_state(job_id)) not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s; log tail:\n{self.log_tail()}")
            time.sleep(0.5)
        return state

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for name, path in self.logs.items():
            if not path.exists():  # died before opening its log: what it said is on stderr
                path = self.workdir / f"{name}.stderr"
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(nothing)"]
            parts.append(f"--- {name} ({path}) ---\n" + "\n".join(text))
        return "\n".join(parts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(workdir: Path, node: str, user: str, munge_socket: Path, requeue_delay: int) -> str:
    d = workdir
    return f"""\
ClusterName=testcluster
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={requeue_delay}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={d}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName={node} NodeHostname={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kill_strays(conf: Path, jobs_only: bool) -> None:
    """SIGKILL processes of this cluster: all carry its SLURM_CONF in their environment, job processes a SLURM_JOB_ID.

    proctrack/linuxproc loses a job process whose parent died; such an orphan outlives scancel and keeps its job
    COMPLETING (and slurmd busy) until it exits.
    """
    for pid_dir in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
            env = (pid_dir / "environ").read_bytes().split(b"\0")
            if (int(pid_dir.name) != os.getpid() and f"SLURM_CONF={conf}".encode() in env
                    and (not jobs_only or any(e.startswith(b"SLURM_JOB_ID=") for e in env))):
                os.kill(int(pid_dir.name), signal.SIGKILL)


@contextlib.contextmanager
def slurm_cluster(workdir: Path, timeout: float = 30, requeue_delay: int = 10) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd under ``workdir``; yield once the node is idle; stop everything on exit.

    ``requeue_delay`` (AuthInfo cred_expire, >= 5; Slurm's default is 120) is how many seconds a requeued job
    stays PENDING (Reason=BeginTime) before it may start again; it is also the job-step credential lifetime.
    """
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # the daemons live in sbin
    if missing := [exe for exe in (*DAEMONS, "sinfo", "scontrol") if not shutil.which(exe, path=path)]:
        raise RuntimeError(f"cannot start a SLURM cluster: no {', '.join(missing)} (apt-get install slurm-wlm munge)")
    workdir, node, user = Path(workdir).resolve(), socket.gethostname().split(".")[0], getpass.getuser()
    if len(f"{workdir}/spool/{node}_1234567.4294967291") > 107:  # the longest Unix socket path we create
        raise ValueError(f"workdir {workdir} is too long for Unix sockets under it; use a shorter one (e.g. "
                         "tmp_path_factory.mktemp('slurm'))")
    for sub in ("munge", "state", "spool"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    (workdir / "munge").chmod(0o755)  # munged wants its socket's directory searchable by all, writable by none
    key, munge_socket = workdir / "munge" / "munge.key", workdir / "munge" / "munge.socket"
    key.unlink(missing_ok=True)  # a reused workdir: the old key is read-only
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = workdir / "slurm.conf"
    conf.write_text(_slurm_conf(workdir, node, user, munge_socket, requeue_delay))
    (workdir / "plugstack.conf").write_text("")  # keep the system's SPANK plugins out
    outer = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")  # in case the tests themselves run inside a Slurm job
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(outer)}, "PATH": path, "SLURM_CONF": str(conf)}
    logs = {name: workdir / f"{name}.log" for name in DAEMONS}
    cluster = SlurmCluster(workdir, conf, node, env, logs)
    commands = {
        "munged": ["munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
                   f"--pid-file={workdir}/munge/munged.pid", f"--log-file={logs['munged']}",
                   f"--seed-file={workdir}/munge/munged.seed"],
        "slurmctld": ["slurmctld", "-D", "-c", "-f", str(conf)],
        "slurmd": ["slurmd", "-D", "-f", str(conf), "-N", node],
    }
    try:
        for name, cmd in commands.items():  # munged logs to stderr in the foreground; Slurm to its LogFile
            with open(logs[name] if name == "munged" else workdir / f"{name}.stderr", "ab") as out:
                cluster.procs[name] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                                       stderr=subprocess.STDOUT, start_new_session=True)
            if name == "munged":
                _wait(lambda: munge_socket.exists(), timeout, f"munged did not open {munge_socket}", cluster)
        _wait(lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", timeout,
              "slurmd did not register as idle", cluster)
        yield cluster
    finally:
        if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                cluster.run("scancel", "--user", user, check=False, timeout=10)
                _wait(lambda: not cluster.run("squeue", "-h", check=False, timeout=10).stdout.strip(), 8, "", None)
        _kill_strays(conf, jobs_only=True)
        for name in reversed(DAEMONS):
            if name in cluster.procs:
                _stop(cluster.procs[name])
        _kill_strays(conf, jobs_only=False)  # slurmstepd, slurmscriptd


def _wait(ready, timeout: float, what: str, cluster: SlurmCluster | None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [n for n, p in cluster.procs.items() if p.poll() is not None] if cluster else []
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"within {timeout:.0f} s"
            raise RuntimeError(f"{what} ({why}); log tail:\n{cluster.log_tail() if cluster else ''}")
        time.sleep(0.2)

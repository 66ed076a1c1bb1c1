"""One job at a time per run folder: `<run folder>/run.lock` names its holder and a heartbeat keeps it fresh.

The lock is a file created whole by a hard link (atomic on local disks, NFS and Lustre, where fcntl locks often
are not) holding the holder's host, PID, process start time, SLURM job id and start date; the holder's thread
touches it every HEARTBEAT_S seconds and the holder removes it when it ends. A holder that died without removing
it (SIGKILL, a node that failed) is detected by its PID on the same host, at once, and by a heartbeat older than
STALE_S on another host (beyond NFS's attribute caching, 60 s by default); its lock is then taken over.
Only the job's launching process (global rank 0) holds it: the other ranks of a DDP job are the same job.
"""
import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .config import ConfigError

LOCK = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 180.0


class RunFolderBusy(ConfigError):
    """Another live job holds the run folder (the message names it)."""


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time (clock ticks after boot) while it lives and is no zombie; None when it does not.
    Without /proc (not Linux): "?" while a signal 0 reaches it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return None if fields[0] in ("Z", "X") else fields[19]


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
            "job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def describe(holder: dict) -> str:
    job = f"SLURM job {holder['job']}, " if holder.get("job") else ""
    return f"{job}PID {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"


def _read(path: Path) -> Optional[tuple[str, float]]:
    """(the lock file's text, seconds since its last heartbeat), or None when there is no lock."""
    try:
        with open(path) as f:  # opening revalidates NFS's cached attributes (close-to-open consistency)
            return f.read(), time.time() - os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None


def _parse(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError:
        return {"host": "?", "pid": "?", "since": "?"}


def live_holder(run_dir) -> Optional[str]:
    """Who holds the run folder, while that job may be alive (None: nobody, or a holder that has ended)."""
    found = _read(Path(run_dir) / LOCK)
    if found is None or stale(_parse(found[0]), found[1]) is not None:
        return None
    return describe(_parse(found[0]))


def stale(holder: dict, age: float) -> Optional[str]:
    """Why the holder is known to have ended, or None while it may be alive."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if holder["pid"] == os.getpid():
            return "this process"
        now = _proc_start(holder["pid"])
        if now is None or (holder.get("start") not in (None, "?") and now not in ("?", holder["start"])):
            return "its process has ended"
        return None
    return f"no heartbeat for {age:.0f} s" if age > STALE_S else None


class RunLock:
    """The run folder's lock, held between acquire() and release() (or as a context manager)."""

    def __init__(self, run_dir, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.path = self.run_dir / LOCK
        self._text, self._made, self._stop = None, [], threading.Event()

    def __enter__(self):
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        """Claim the folder (made if missing), or raise RunFolderBusy naming the live holder."""
        self._made = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]  # deepest first
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._text = json.dumps(_me())
        tmp = self.run_dir / f".{LOCK}.{secrets.token_hex(4)}"
        tmp.write_text(self._text)
        try:
            for _ in range(5):
                if self._link(tmp):
                    threading.Thread(target=self._beat, daemon=True, name="run-lock-heartbeat").start()
                    return
                self._take_over_if_stale()
        finally:
            tmp.unlink(missing_ok=True)
        raise RunFolderBusy(f"run folder {self.run_dir}: could not claim {self.path} (taken over by others "
                            f"as it was freed)")

    def _link(self, tmp: Path) -> bool:
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(self._text)
        return True

    def _take_over_if_stale(self) -> None:
        found = _read(self.path)
        if found is None:
            return  # freed meanwhile
        text, age = found
        holder = _parse(text)
        reason = stale(holder, age)
        if reason is None:
            raise RunFolderBusy(
                f"run folder {self.run_dir} is in use by {describe(holder)} (heartbeat {age:.0f} s ago): a second "
                f"job would overwrite its checkpoints; wait for it to end or use another --name (a holder that died "
                f"is detected by its PID on its host, elsewhere after {STALE_S:.0f} s without a heartbeat)")
        print(f"warning: taking over {self.path} from {describe(holder)} ({reason})", file=sys.stderr)
        again = _read(self.path)
        if again is not None and again[0] == text:  # not already taken over by another job meanwhile
            self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # gone (taken over after a long stall, or the folder removed): nothing to keep fresh

    def release(self) -> None:
        """Remove the lock if it is still this process's; remove the folders acquire() made too while nothing was
        written into them (a config error stops a new run before it starts)."""
        self._stop.set()
        if self._text is None:
            return
        try:
            if self.path.read_text() == self._text:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._text = None
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run wrote into it

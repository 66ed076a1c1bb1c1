"""What an operator meets (issue 29): a checkpoint that would run code, two jobs on one run folder, a full disk,
the umask; each as a user meets it: train.py in real processes, a real small filesystem where the test may mount
one (root, as in CI; else a write that raises ENOSPC)."""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ldm.training.checkpointing import AtomicCheckpointIO
from ldm.formats.convert import CheckpointError, read_checkpoint
import train
from test_reliability import NO_VAL, start_train, step_of, wait_for
from test_train import ROOT, TINY, run_here, run_train


def errors(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- a checkpoint that would run code
class RunsAShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):  # what unpickling calls: os.system(command)
        return os.system, (self.command,)


def test_a_checkpoint_that_pickles_a_command_is_refused_and_never_runs(tmp_path):
    """`--resume PATH` and `--resume auto` (the file as the run folder's last.ckpt), Lightning's restore, eval and
    export's reader: the command (touch a file) never runs; train.py exits 2 with one line naming file and global."""
    touched = tmp_path / "touched"
    evil = {"global_step": 5, "state_dict": {}, "payload": RunsAShellCommand(f"touch {touched}")}
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for path in (tmp_path / "evil.ckpt", tmp_path / "run" / "checkpoints" / "last.ckpt"):
        torch.save(evil, path)
    runs = {flag: (path, start_train(tmp_path, "--resume", resume, name=name))  # both at once: half the wait
            for flag, resume, path, name in (("--resume auto", "auto", tmp_path / "run" / "checkpoints" / "last.ckpt",
                                              "run"),
                                             ("--resume", str(tmp_path / "evil.ckpt"), tmp_path / "evil.ckpt", "new"))}
    for flag, (path, proc) in runs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2 and not touched.exists(), stderr[-2000:]
        assert errors(stderr) == [f"error: {flag}: {path}: not loaded: its pickle calls for posix.system, which no "
                                  f"checkpoint written by train.py holds (unpickling it could run code)"], stderr[-2000:]
        assert "Traceback" not in stderr
    with pytest.raises(ValueError, match="posix.system"):  # UnsafeCheckpointError
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")  # trainer.fit(ckpt_path=...)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'evil.ckpt'}: not loaded: its pickle calls for "
                                              f"posix.system"):
        read_checkpoint(tmp_path / "evil.ckpt")  # eval.py, export.py (which stub foreign classes, inert)
    assert not touched.exists()


# ---------------------------------------------------------------- one job per run folder
@pytest.mark.slow
def test_a_second_job_is_refused_while_the_first_lives_and_takes_over_once_it_died(tmp_path, capsys):
    """Job A trains; job B (`--resume auto`, as a double-submitted sbatch; train.main in this process: a second
    process, one start-up of torch fewer) exits 2 naming A and writes nothing.
    A is killed (SIGKILL: no chance to release the lock); C resumes on 2 DDP processes (rank 1 is C's own, not
    refused) from A's 1-process checkpoint, takes the stale lock over and trains to the last step."""
    a = start_train(tmp_path, "trainer.max_steps=400", "run.checkpoint_every_n_steps=2", *NO_VAL,
                    "+min_step_seconds=1", script="tests/fault_probe.py")  # mostly asleep while B starts
    ckpts = tmp_path / "run" / "checkpoints"
    try:
        wait_for(ckpts / "step00000002.ckpt", a)
        before = {p: p.stat().st_mtime_ns for p in ckpts.glob("step*.ckpt")}
        code = train.main([*TINY, f"run.log_dir={tmp_path}", "--name", "run", "--resume", "auto"])
        stderr = capsys.readouterr().err
        assert code == 2, stderr[-2000:]
        lock = json.loads((tmp_path / "run" / "run.lock").read_text())
        assert (lock["host"], lock["pid"]) == (socket.gethostname(), a.pid)
        [line] = errors(stderr)
        assert line.startswith(f"error: run folder {tmp_path / 'run'} is in use by PID {a.pid} on "
                               f"{socket.gethostname()}, since {lock['since']} (heartbeat ") and "--name" in line, line
        assert "resuming from" not in stderr  # refused before it read (or pruned) anything
        assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.exists())  # A's, not rewritten by B
    finally:
        a.kill()  # SIGKILL: no chance to release the lock
        a.communicate()
    assert (tmp_path / "run" / "run.lock").exists()
    newest = max(step_of(p) for p in ckpts.glob("*.ckpt"))
    c = run_train(tmp_path, "trainer.max_steps=" + str(newest + 2), "trainer.devices=2", "trainer.strategy=ddp",
                  "run.checkpoint_every_n_steps=2", *NO_VAL, resume="auto")
    assert f"taking over {tmp_path / 'run' / 'run.lock'} from PID {a.pid} on" in c.stderr
    assert "its process has ended" in c.stderr and "MEMBER: 2/2" in c.stdout + c.stderr
    assert step_of(ckpts / "last.ckpt") == newest + 2  # the 1-process run, continued on 2, to its last step
    assert not (tmp_path / "run" / "run.lock").exists()  # released at the end


def _lock_of(run_dir: Path, host: str, age_s: float, pid=1, start="1") -> None:
    from ldm.training import runlock
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / runlock.LOCK
    path.write_text(json.dumps({"host": host, "pid": pid, "start": start, "job": "77", "since": "then"}))
    os.utime(path, (time.time() - age_s,) * 2)


def test_a_holder_is_stale_by_its_pid_on_this_host_and_by_its_heartbeat_elsewhere(tmp_path, monkeypatch, capsys):
    """Another host: a heartbeat younger than STALE_S holds the folder, an older one is taken over, and the holder's
    own heartbeat keeps the file's mtime fresh. This host: the PID decides (alive, ended, or reused by another
    process), whatever the heartbeat. The job id is named."""
    from ldm.training import runlock
    from ldm.training.runlock import RunFolderBusy, RunLock
    run_dir = tmp_path / "run"
    _lock_of(run_dir, "node-b", age_s=runlock.STALE_S - 30)
    with pytest.raises(RunFolderBusy, match=r"in use by SLURM job 77, PID 1 on node-b, since then \(heartbeat 150 s"):
        RunLock(run_dir).acquire()
    _lock_of(run_dir, "node-b", age_s=runlock.STALE_S + 30)
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with RunLock(run_dir) as held:
        assert f"taking over {held.path} from SLURM job 77, PID 1 on node-b" in capsys.readouterr().err
        assert json.loads(held.path.read_text())["pid"] == os.getpid()
        os.utime(held.path, (time.time() - 100,) * 2)
        time.sleep(0.5)
        assert time.time() - held.path.stat().st_mtime < 5  # the heartbeat touched it
    assert not held.path.exists()
    ended = subprocess.Popen(["true"])
    ended.wait()
    # on this host the PID decides, not the heartbeat: alive, ended, or alive but another process (PID reused)
    for pid, start, busy in ((os.getppid(), None, True), (ended.pid, None, False), (os.getppid(), "1", False)):
        _lock_of(run_dir, socket.gethostname(), age_s=10 * runlock.STALE_S, pid=pid, start=start)
        if busy:
            with pytest.raises(RunFolderBusy, match=f"in use by SLURM job 77, PID {pid} on {socket.gethostname()}"):
                RunLock(run_dir).acquire()
        else:
            with RunLock(run_dir):
                assert "(its process has ended)" in capsys.readouterr().err
    with RunLock(tmp_path / "logs" / "new"):
        pass
    assert not (tmp_path / "logs").exists()  # folders made for the lock go again if nothing was written into them


# ---------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 150 MB tmpfs (root, as in CI) and a function that resizes it, or (None, None) where mounting fails."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None or subprocess.run(
            [mount, "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(disk)], capture_output=True).returncode:
        yield None, None
        return

    def resize(mb):
        subprocess.run([mount, "-o", f"remount,size={mb}m", str(disk)], check=True)
    try:
        yield disk, resize
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_resume_auto_finishes_once_there_is_room(tmp_path, small_disk):
    """Run folder on 150 MB: the step-2 checkpoint and last.ckpt (61 MB each) fit, the step-4 one does not. One
    line names the file and the newest intact checkpoint; no partial file; after a resize --resume auto ends at
    the last step. (Without root: the step-4 save raises ENOSPC instead, tests/fault_probe.py.)"""
    disk, resize = small_disk
    args = ["trainer.max_steps=6", "run.checkpoint_every_n_steps=2", "run.keep_last_k=1", *NO_VAL]
    where = tmp_path if disk is None else disk
    inject = [] if disk is not None else ["+no_space=step00000004.ckpt"]
    proc = run_train(where, *args, *inject, script="tests/fault_probe.py", check=False)
    ckpts = where / "run" / "checkpoints"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors(proc.stderr) == [
        f"error: No space left on device: could not write {ckpts / 'step00000004.ckpt'}; newest intact checkpoint: "
        f"{ckpts / 'last.ckpt'} (step 2); make room, then --resume auto continues from it"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step00000002.ckpt"]  # whole, no partial file
    assert step_of(ckpts / "last.ckpt") == 2
    if resize is not None:
        resize(400)
    run_here(where, *args, resume="auto")
    assert step_of(ckpts / "last.ckpt") == 6 and sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt", "step00000006.ckpt"]


def test_a_tiled_decode_that_fills_its_store_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    """A CPU decode's tile states go to files under the store folder: on a full disk (a 1 MB tmpfs, else a write
    that raises ENOSPC) the error names the store, and the decode's temporary folder is gone."""
    from ldm.modules import tiling
    from tiling_probe import inputs, tiny_vae
    vae = tiny_vae()
    z, image, mask = inputs(1, 256, 256)
    store = tmp_path / "store"
    store.mkdir()
    mounted = os.geteuid() == 0 and not subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(store)], capture_output=True).returncode
    if not mounted:
        real_open = open

        def full_after_3(path, mode="r", *a, **k):
            if "w" in mode and len(list(Path(path).parent.iterdir())) > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_open(path, mode, *a, **k)
        monkeypatch.setattr(tiling, "open", full_after_3, raising=False)
    try:
        with pytest.raises(OSError, match=f"No space left on device in the tile store {store} "):
            tiling.tiled_decode(vae.decoder, vae.post_quant_conv(z), (1 - mask) * image, mask, tile=16, store=store)
        assert list(store.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(store)], capture_output=True)


def test_every_script_says_a_full_disk_in_train_pys_one_line():
    """Each script's main (train.py's too) goes through ldm.cli.script_main: ENOSPC or EDQUOT, also as the cause of
    another error (torch.save raises a RuntimeError), is one line and exit code 2; any other error stays a traceback.
    scripts/eval.py on a real full disk: test_eval.py."""
    import ast
    from ldm.cli import script_main
    scripts = [ROOT / "train.py", *sorted((ROOT / "scripts").rglob("*.py"))]
    mains = {path.relative_to(ROOT): [ast.unparse(d) for d in node.decorator_list] for path in scripts
             for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef) and node.name == "main"}
    assert len(mains) >= 11 and all(d == ["script_main"] for d in mains.values()), mains

    def fails(err):
        def main(argv=None):
            try:
                raise err
            except OSError:
                raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return script_main(main)
    full = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/scratch/out/results.json")
    assert fails(full)() == 2
    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):
        fails(OSError(errno.EACCES, os.strerror(errno.EACCES), "/scratch/out/results.json"))()


def test_a_tile_is_an_int_larger_than_the_overlap():
    from tiling_probe import inputs, tiny_vae
    vae = tiny_vae()
    z, image, mask = inputs(1, 64, 64)
    for tile, overlap in ((True, 8), (8, 8), (16.0, 8), (0, 8), (12, -1)):
        with pytest.raises(ValueError, match=r"must be an int (larger than the overlap|>= 0)") as err:
            vae.decode(z, image, mask, tile=tile, tile_overlap=overlap)
        assert "\n" not in str(err.value)
    assert vae.decode(z, image, mask, tile=6, tile_overlap=5).shape == image.shape


# ---------------------------------------------------------------- the umask
WRITERS = textwrap.dedent("""
    import json, os, sys, torch
    sys.path[:0] = [{root!r}, {root!r} + "/scripts", {root!r} + "/tests"]
    import export
    from ldm.training.checkpointing import atomic_save
    from ldm.evaluation.loop import write_reports
    from ldm.metrics import save_grid
    from ldm import AsymmetricAutoencoderKL
    model = AsymmetricAutoencoderKL(ch=32, num_res_blocks=1, encoder_ch=32, encoder_num_res_blocks=1)
    out, modes = {out!r}, {{}}
    for umask in (0o002, 0o022):
        os.umask(umask)
        folder = os.path.join(out, oct(umask))
        paths = [p for fmt in ("diffusers", "decoder", "official")
                 for p in getattr(export, "save_" + fmt)(model, os.path.join(folder, fmt))]
        save_grid(torch.zeros(3, 8, 8, dtype=torch.uint8), os.path.join(folder, "samples", "step1.png"))
        atomic_save({{"global_step": 1}}, os.path.join(folder, "checkpoints", "last.ckpt"))
        write_reports(os.path.join(folder, "eval"), {{}}, [], {{}}, torch.zeros(3, 8, 8, dtype=torch.uint8))
        modes[oct(umask)] = {{os.path.relpath(os.path.join(d, f), folder): oct(os.stat(os.path.join(d, f)).st_mode & 0o777)
                              for d, _, files in os.walk(folder) for f in files}}
    print(json.dumps(modes))
""")


def test_every_file_we_write_honours_the_umask(tmp_path):
    """Exports (safetensors, the official .ckpt, config.json), sample grids, checkpoints and eval's outputs get
    0666 less the umask, as any file a program creates (they were 0600: a temporary file renamed into place)."""
    code = WRITERS.format(root=str(ROOT), out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = json.loads(proc.stdout.strip().splitlines()[-1])
    for umask, want in (("0o2", "0o664"), ("0o22", "0o644")):
        assert len(modes[umask]) == 11 and set(modes[umask].values()) == {want}, (umask, modes[umask])

"""Ablations in one command: train a base recipe and its variants, evaluate them together, write one table.

    python scripts/ablate.py [SET.yaml] [-c CONFIG ...] [key=value ...] [--variant NAME[=ITEM,...] ...] \\
        [--out DIR] [--changed refuse|resume|restart] [--slurm [--sbatch OPTS] [--sbatch-report OPTS]] \\
        [--report-only] [--eval "scripts/eval.py flags, e.g. --masks medium --num-images 100"]

The base is SET.yaml's `base` items, then -c files, then key=value overrides. A variant is a name and
items: `--variant no_gan` (configs/ablations/no_gan.yaml), `--variant asym=` (the base itself),
`--variant wide=model.autoencoder.ch=64,no_gan`; SET.yaml lists them (configs/ablations/sets/). Every
variant's resolved config is written to DIR/<variant>/config.yaml before anything trains (an invalid one
is refused, naming it: exit 2). Then each trains in DIR/<variant>/, locally one after another or, with
--slurm, as one job each through scripts/slurm/train.sbatch; finished variants are skipped, interrupted
ones resume, changed ones are refused unless --changed says otherwise. Once all have finished their
last checkpoints (EMA weights) are evaluated by scripts/eval.py on the same fixed masks and images, into
DIR/report/: ablation.md and ablation.csv (a row per variant and output, with its config delta), and
eval's results.md, results.csv, results.json and grid.png. Under --slurm a last job, after all the
others, runs this command with --report-only.
"""
import argparse
import shlex
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "scripts"))
import eval as eval_script  # noqa: E402  (scripts/eval.py)
from ldm.evaluation.ablation import REPORT, Plan, changes, delta, load_set, parse_variant, prepare, progress, resolve, write_report  # noqa: E402
from ldm.training.config import ConfigError  # noqa: E402
from ldm.cli import script_main  # noqa: E402

SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
OWN_EVAL_FLAGS = ("--decoder", "--name", "--out")  # eval.py flags this script sets itself


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # report_argv() drops the submission flags by their full names
    p.add_argument("items", nargs="*", help="a set file (*.yaml) and/or key=value overrides of the base")
    p.add_argument("-c", "--config", action="append", default=[], help="base config file (repeat)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME[=ITEM,...]",
                   help="a variant: an ablation name or .yaml, or NAME=items (key=value, ablations, .yaml)")
    p.add_argument("--out", default=None, help="ablation folder (default: <base run.log_dir>/ablate_<set name>)")
    p.add_argument("--changed", choices=("refuse", "resume", "restart"), default="refuse",
                   help="a variant whose run began with another config: refuse (default), resume it, or retrain it")
    p.add_argument("--slurm", action="store_true", help="submit one job per variant and a report job after them")
    p.add_argument("--sbatch", default="", metavar="OPTS", help='sbatch options of the training jobs, e.g. '
                                                                '--sbatch="--nodes=2 --gpus-per-node=8"')
    p.add_argument("--sbatch-report", default="", metavar="OPTS", help="sbatch options of the report job")
    p.add_argument("--report-only", action="store_true", help="train nothing: evaluate finished variants, report")
    p.add_argument("--eval", action="append", default=[], metavar="FLAGS",
                   help='scripts/eval.py flags (after the set file\'s), e.g. --eval "--masks thin --num-images 100"')
    args = p.parse_intermixed_args(argv)  # overrides on either side of the flags
    eval_argv = [a for flags in args.eval for a in shlex.split(flags)]
    sets = [i for i in args.items if "=" not in i]
    if len(sets) > 1:
        p.error(f"one set file at most, got {sets}")
    for flag in OWN_EVAL_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in eval_argv):
            p.error(f"{flag} is set by ablate.py (variants are named by --variant, the output goes to --out)")
    args.set, args.overrides, args.eval_argv = (sets or [None])[0], [i for i in args.items if "=" in i], eval_argv
    return args


def make_plan(args) -> Plan:
    chosen = load_set(args.set) if args.set else {"name": "ablation", "base": [], "variants": [], "eval_args": []}
    variants = chosen["variants"] + [parse_variant(spec) for spec in args.variant]
    if not variants:
        raise ConfigError("no variants: give a set file or --variant (e.g. --variant asym= --variant no_gan)")
    return Plan(chosen["name"], [*chosen["base"], *args.config, *args.overrides], variants,
                [*chosen["eval_args"], *args.eval_argv], Path(args.out) if args.out else None)


def eval_argv(plan, base, configs) -> list:
    """eval.py's arguments: every variant's last checkpoint; the images, resolution and LPIPS from the base
    config and masks `mixed`, unless the plan's eval flags give them."""
    argv = [a for name in configs for a in ("--decoder", str(plan.run_dir(name) / "checkpoints" / "last.ckpt"),
                                            "--name", name)]
    data = base.data.val_source if base.data.val_source is not None else base.data.source
    given = {a.split("=")[0] for a in plan.eval_args}
    defaults = [("--data", str(data)), ("--masks", "mixed"), ("--resolution", str(base.data.resolution))]
    argv += [a for flag, value in defaults if flag not in given for a in (flag, value)]
    if not given & {"--lpips-pretrained", "--no-lpips-pretrained"}:
        argv.append("--lpips-pretrained" if base.perceptual.pretrained else "--no-lpips-pretrained")
    return argv + ["--out", str(plan.out / REPORT), *plan.eval_args]


def train_locally(plan, configs) -> int:
    """Train the variants one after another (train.py in a subprocess each: its own Lightning state)."""
    for name, cfg in configs.items():
        step, total = progress(plan.run_dir(name)), cfg.trainer.max_steps
        if step >= total:
            print(f"ablate: {name}: finished (step {step}), skipped", flush=True)
            continue
        print(f"ablate: {name}: {'resuming at step %d' % step if step else 'training'} to step {total}", flush=True)
        cmd = [sys.executable, str(ROOT / "train.py"), "-c", str(plan.run_dir(name) / "config.yaml"),
               "--name", name, "--resume", "auto"]
        code = run_forwarding_signals(cmd)
        if code:
            print(f"error: ablate: variant '{name}': train.py exited with code {code}", file=sys.stderr)
            return code
        if progress(plan.run_dir(name)) < total:  # stopped by a signal: checkpoint saved, exit 0
            print(f"ablate: {name}: stopped at step {progress(plan.run_dir(name))} of {total}; run again to resume",
                  file=sys.stderr)
            return 1
    return 0


def run_forwarding_signals(cmd) -> int:
    """Run `cmd`, passing SIGTERM and SIGUSR1 on to it (train.py then saves its step and exits; a second one
    changes nothing), so that stopping this script stops the variant in training instead of orphaning it. A
    terminal's Ctrl-C reaches the child itself (one process group): this script ignores it and waits for the save."""
    child = subprocess.Popen(cmd)
    forward = {sig: signal.signal(sig, lambda signum, frame: child.send_signal(signum))
               for sig in (signal.SIGTERM, signal.SIGUSR1)}
    forward[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return child.wait()
    finally:
        for sig, previous in forward.items():
            signal.signal(sig, previous)


def sbatch(options: list, *args) -> str:
    """Submit; returns the job id (sbatch --parsable prints 'id' or 'id;cluster')."""
    out = subprocess.run(["sbatch", "--parsable", *options, *args], capture_output=True, text=True)
    if out.returncode:
        raise ConfigError(f"sbatch failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def submit(plan, configs, argv, args) -> int:
    """One training job per unfinished variant, then the report job (this command, --report-only) after them all."""
    if not SBATCH.is_file():
        raise ConfigError(f"--slurm: {SBATCH} not found")
    ids = []
    for name, cfg in configs.items():
        run_dir = plan.run_dir(name)
        step, job = progress(run_dir), queued(run_dir)
        if step >= cfg.trainer.max_steps:
            print(f"ablate: {name}: finished (step {step}), not submitted", flush=True)
            continue
        if job:  # submitted before and still pending or running: a second job would train the same folder
            print(f"ablate: {name}: already in the queue as job {job}", flush=True)
        else:
            job = sbatch([f"--job-name={plan.name}.{name}", f"--output={run_dir}/slurm-%j.out",
                          *shlex.split(args.sbatch)], str(SBATCH), "-c", str(run_dir / "config.yaml"),
                         "--name", name, f"run.log_dir={plan.out}")
            (run_dir / "slurm_job").write_text(job + "\n")
            print(f"ablate: {name}: submitted job {job}", flush=True)
        ids.append(job)
    report = shlex.join([sys.executable, str(Path(__file__).resolve()), *report_argv(argv)])
    after = [f"--dependency=afterany:{':'.join(ids)}"] if ids else []
    job = sbatch([*after, f"--job-name={plan.name}.report", f"--output={plan.out}/report-%j.out",
                  *shlex.split(args.sbatch_report)], "--wrap", report)
    print(f"ablate: report job {job} (after {', '.join(ids) or 'nothing'}): {plan.out / REPORT}", flush=True)
    return 0


def queued(run_dir: Path):
    """The id of the job last submitted for this run if SLURM still has it pending or running, else None."""
    path = run_dir / "slurm_job"
    if not path.is_file():
        return None
    job = path.read_text().strip()
    out = subprocess.run(["squeue", "--noheader", "--jobs", job, "--format=%T"], capture_output=True, text=True)
    alive = out.returncode == 0 and out.stdout.strip() in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED",
                                                            "SUSPENDED", "COMPLETING")
    return job if alive else None


def report_argv(argv) -> list:
    """This command's arguments without the submission flags, plus --report-only."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--sbatch", "--sbatch-report"):
            skip = True
        elif arg != "--slurm" and not arg.startswith(("--sbatch=", "--sbatch-report=")):
            out.append(arg)
    return [*out, "--report-only"]


def report(plan, base, configs) -> int:
    """Evaluate every variant's last checkpoint together; write the table."""
    steps = {name: progress(plan.run_dir(name)) for name in configs}
    missing = [f"{n} (step {steps[n]} of {c.trainer.max_steps})" for n, c in configs.items()
               if steps[n] < c.trainer.max_steps]
    if missing:
        raise ConfigError(f"not finished, nothing evaluated: {', '.join(missing)}")
    for name, cfg in configs.items():  # the table's deltas must describe the runs evaluated
        if changes(plan.run_dir(name), cfg):
            raise ConfigError(f"variant '{name}': {plan.run_dir(name)}/config.yaml is not this variant's config "
                              f"({'; '.join(changes(plan.run_dir(name), cfg))}); run without --report-only first")
    code = eval_script.main(eval_argv(plan, base, configs))
    if code:
        return code
    paths = write_report(plan, plan.out / REPORT / "results.json",
                         {name: delta(base, cfg) for name, cfg in configs.items()}, steps)
    print(paths[0].read_text())
    print("\n".join(map(str, paths)), file=sys.stderr)
    return 0


@script_main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        plan = make_plan(args)
        base, configs = resolve(plan)
        eval_script.parse_args(eval_argv(plan, base, configs))  # a bad eval flag stops here, not after training
        if args.report_only:
            return report(plan, base, configs)
        prepare(plan, configs, args.changed)
        if args.slurm:
            return submit(plan, configs, argv, args)
        code = train_locally(plan, configs)
        return code or report(plan, base, configs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Ablations: one base recipe and named variants of it, each resolved, trained in its own run folder, then
evaluated together into one table.

A variant (and the base) is a list of items: `key=value` overrides, YAML files (`*.yaml`), or names of
ablation files (`no_gan` = configs/ablations/no_gan.yaml). Layers merge over configs/base.yaml in order:
the base's files, the base's overrides, the variant's files, the variant's overrides, each strictly
(ldm.training.config). scripts/ablate.py turns the command line into these calls.
"""
import csv
import io
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ..training.checkpointing import checkpoint_step, newest_readable_checkpoint
from ..training.config import ConfigError, config_changes, dotlist, load_file, merge_layers, to_container
from .loop import COLUMNS, HEADINGS, fmt
from ..files import atomic_write, atomic_write_text
from ..training.runlock import live_holder

ROOT = Path(__file__).resolve().parents[2]  # the repository (ldm/evaluation/ is two below)
ABLATIONS = ROOT / "configs" / "ablations"
REPORT = "report"  # <out>/report/: the evaluation and the table; no variant may take this name


@dataclass
class Variant:
    """A named list of items over the base (empty: the base itself)."""

    name: str
    items: list = field(default_factory=list)


@dataclass
class Plan:
    """What an ablation is: the base items, the variants in order, eval.py flags, and where it all goes."""

    name: str
    base: list
    variants: list
    eval_args: list
    out: Path = None  # None: <the base's run.log_dir>/ablate_<name>, set by resolve()

    def run_dir(self, variant: str) -> Path:
        return self.out / variant


# ---- reading variants and sets -------------------------------------------------------------------------
def split_items(text: str) -> list:
    """'a,b=[1,2],c' -> ['a', 'b=[1,2]', 'c']: commas inside brackets or braces belong to a value."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_variant(spec: str) -> Variant:
    """`NAME` (the ablation file NAME, or a YAML path named by its stem), `NAME=` (the base itself) or
    `NAME=ITEM,ITEM,...`."""
    if "=" not in spec:
        return Variant(Path(spec).stem if spec.endswith((".yaml", ".yml")) else spec, [spec])
    name, items = spec.split("=", 1)
    return Variant(name.strip(), split_items(items))


def load_set(path) -> dict:
    """A set file: {'base': [items], 'variants': {name: [items]}, 'eval': {eval.py flag: value}} (all optional
    but variants). Returns {'name', 'base', 'variants' (list of Variant), 'eval_args'}."""
    path = find_file(path)
    raw = to_container(load_file(path))
    unknown = sorted(set(raw) - {"base", "variants", "eval"})
    if unknown:
        raise ConfigError(f"set file {path}: unknown section '{unknown[0]}' (expected base, variants, eval)")
    variants = raw.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"set file {path}: 'variants' must map each variant's name to a list of items")
    for key, items in [("base", raw.get("base", [])), *variants.items()]:
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"set file {path}: '{key}' must be a list of items (key=value, a .yaml, an ablation)")
    return {"name": path.stem, "base": raw.get("base", []), "eval_args": eval_flags(raw.get("eval") or {}, path),
            "variants": [Variant(str(name), items) for name, items in variants.items()]}


def eval_flags(options: dict, source) -> list:
    """{'masks': 'medium', 'lpips_pretrained': False} -> ['--masks', 'medium', '--no-lpips-pretrained']."""
    if not isinstance(options, dict):
        raise ConfigError(f"set file {source}: 'eval' must map scripts/eval.py flags to values")
    argv = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def find_file(path) -> Path:
    """A path as given (from the current folder), else from the repository root (the bundled configs)."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (ROOT / path).is_file():
        return ROOT / path
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return path


def layers(items) -> list:
    """(source, config) layers of items, in order: each file, then the overrides as one layer."""
    files = [i for i in items if "=" not in i]
    out = []
    for item in files:
        path = ABLATIONS / f"{item}.yaml" if not item.endswith((".yaml", ".yml")) else find_file(item)
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in ABLATIONS.glob("*.yaml")))
            raise ConfigError(f"no ablation '{item}' (configs/ablations/ has {known}; or give a .yaml path)")
        out.append((str(path), load_file(path)))
    overrides = [i for i in items if "=" in i]
    if overrides:
        out.append(("overrides", dotlist(overrides)))
    return out


# ---- resolving ----------------------------------------------------------------------------------------
def resolve(plan: Plan, base_yaml=ROOT / "configs" / "base.yaml") -> tuple:
    """(base config, {variant: config}); every variant is checked before any is returned, and the first
    invalid one raises ConfigError naming it. run.log_dir is the ablation's folder (plan.out) in all of them."""
    names = [v.name for v in plan.variants]
    for v in plan.variants:
        if not v.name or v.name == REPORT or "/" in v.name or v.name.startswith("."):
            raise ConfigError(f"variant name {v.name!r}: must be a plain folder name other than '{REPORT}'")
        if names.count(v.name) > 1:
            raise ConfigError(f"variant '{v.name}' is given twice")

    def build(items, label):
        try:
            cfg = merge_layers(base_yaml, [*layers(plan.base), *layers(items)])  # a variant beats the base
        except ConfigError as err:
            raise ConfigError(f"{label}: {err}") from None
        if plan.out is None:  # the base, built first
            plan.out = Path(cfg.run.log_dir) / f"ablate_{plan.name}"
        OmegaConf.update(cfg, "run.log_dir", str(plan.out))
        if not (isinstance(cfg.trainer.max_steps, int) and cfg.trainer.max_steps > 0):
            raise ConfigError(f"{label}: trainer.max_steps must be a positive step count (a run is finished at it)")
        return cfg

    base = build([], "base")
    return base, {v.name: build(v.items, f"variant '{v.name}'") for v in plan.variants}


def delta(base, cfg) -> list:
    """The keys where `cfg` differs from `base`, as `key=value` (JSON values), in the base's key order (a
    variant only adds to the base's keys)."""
    return [f"{k}={now if isinstance(now, str) else json.dumps(now)}"
            for k, (_, now) in config_changes(to_container(base), to_container(cfg)).items()]


# ---- run folders -------------------------------------------------------------------------------------
def progress(run_dir: Path) -> int:
    """Global step of the run's newest readable checkpoint (0: none)."""
    best, _ = newest_readable_checkpoint(run_dir / "checkpoints", hpc_dir=run_dir)
    return 0 if best is None else checkpoint_step(best)


def changes(run_dir: Path, cfg) -> list:
    """'key: then -> now' for each key of the saved config.yaml that `cfg` changes ([] when none is saved);
    run.log_dir is not a change (an ablation folder may move)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return []
    diff = config_changes(to_container(OmegaConf.load(saved)), to_container(cfg), ignore=("run.log_dir",))
    return [f"{k}: {then!r} -> {now!r}" for k, (then, now) in diff.items()]


def prepare(plan: Plan, configs: dict, on_change: str = "refuse") -> dict:
    """Write every variant's resolved config.yaml into its run folder; returns {variant: step it is at}.

    A variant whose run has checkpoints from another config is refused (ConfigError naming it and the keys)
    before anything is written, unless on_change is 'resume' (train.py continues it, refusing changes
    that shape the weights) or 'restart' (its run folder is deleted and it trains again)."""
    steps, changed = {}, {}
    for name, cfg in configs.items():
        run_dir = plan.run_dir(name)
        steps[name] = progress(run_dir)
        diff = changes(run_dir, cfg) if steps[name] else []
        if diff:
            changed[name] = diff
    for name in changed:  # a live job trains it with its old config: neither rewrite nor delete it under that job
        holder = live_holder(plan.run_dir(name))
        if holder is not None:
            raise ConfigError(f"variant '{name}' has changed, but its run folder {plan.run_dir(name)} is in use by "
                              f"{holder}: wait for that job to end")
    if changed and on_change == "refuse":
        name, diff = next(iter(changed.items()))
        raise ConfigError(f"variant '{name}' has changed since its run {plan.run_dir(name)} started ({'; '.join(diff)}); "
                          f"pass --changed resume to continue it with the new config, or --changed restart to "
                          f"train it again" + (f" (changed too: {', '.join(list(changed)[1:])})" if len(changed) > 1 else ""))
    for name, cfg in configs.items():
        if name in changed and on_change == "restart":
            shutil.rmtree(plan.run_dir(name))
            steps[name] = 0
        atomic_write(plan.run_dir(name) / "config.yaml",
                     lambda tmp, cfg=cfg: OmegaConf.save(cfg, tmp, resolve=True))  # as train.py writes it
    return steps


# ---- the report --------------------------------------------------------------------------------------
def report_rows(results: dict, deltas: dict) -> list:
    """[{'table', 'variant', 'output', 'delta', metric: value, ...}] from eval's results.json: a row per table
    (generated, when eval ran a pipeline, then reconstruction), variant and output eval wrote (raw, pasted, ...),
    the overall means, NaN/None as None."""
    rows = []
    tables = [("generated", results["generated"])] if "generated" in results else []
    for table, metrics in tables + [("reconstruction", results["metrics"])]:
        for name, outputs in metrics.items():
            for output, buckets in outputs.items():
                values = buckets.get("all", {})
                rows.append({"table": table, "variant": name, "output": output,
                             "delta": "; ".join(deltas.get(name, [])) or "(base)",
                             **{k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                                for k, v in values.items()}})
    return rows


def write_report(plan: Plan, results_json: Path, deltas: dict, steps: dict) -> list:
    """<out>/report/ablation.md and ablation.csv (a row per table, variant and output, with its config delta) next
    to eval's results.md/csv/json and grid.png; returns the two paths."""
    results = json.loads(Path(results_json).read_text())
    rows = report_rows(results, deltas)
    metric_keys = list(dict.fromkeys(k for row in rows for k in row if k not in ("table", "variant", "output",
                                                                                  "delta")))
    columns = [c for c in COLUMNS if c[0] in metric_keys]  # eval's own column titles and formats, in its order
    folder = Path(results_json).parent
    lines = [f"# Ablation: {plan.name}", "",
             f"- base: `{' '.join(plan.base) or '(configs/base.yaml)'}`; each row's delta is its resolved config "
             f"against the base's",
             f"- runs: {plan.out}/<variant>/ (config.yaml, checkpoints/last.ckpt: its EMA weights evaluated); steps: "
             + ", ".join(f"{n} {s}" for n, s in steps.items()),
             "- per hole-area bucket: results.md; images: grid.png (a column pair per variant, in table order)",
             *[f"- {note}" for note in results.get("notes", [])]]
    for table in dict.fromkeys(row["table"] for row in rows):
        lines += ["", f"## {HEADINGS[table]}", "",
                  "| variant | delta | output | " + " | ".join(t for _, t, _ in columns) + " |",
                  "|---|---|---|" + "---:|" * len(columns)]
        for row in (r for r in rows if r["table"] == table):
            cells = [fmt(row.get(key), pattern) for key, _, pattern in columns]
            lines.append(f"| {row['variant']} | {row['delta']} | {row['output']} | " + " | ".join(cells) + " |")
    paths = [folder / "ablation.md", folder / "ablation.csv"]
    atomic_write_text(paths[0], "\n".join(lines) + "\n")
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["table", "variant", "output", "delta", *metric_keys])
    for row in rows:
        writer.writerow([row["table"], row["variant"], row["output"], row["delta"],
                         *["" if row.get(k) is None else repr(row[k]) for k in metric_keys]])
    atomic_write_text(paths[1], text.getvalue())
    return paths

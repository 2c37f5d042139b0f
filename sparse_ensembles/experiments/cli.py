"""``sparse-ensembles`` command line: run, distill, fit, evaluate, download."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data import DATASETS, DataError, download, download_cifar10
from ..training import DivergenceError
from . import config as config_mod
from .config import ConfigError
from .evaluate import evaluate_run
from ..checkpoint import RunFileError
from ..metrics import MetricInputError
from .pipeline import Pipeline, run_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-ensembles", description="Sparse structured ensembles by SG-MCMC and pruning")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment config end to end")
    run.add_argument("config", help="a TOML config (see configs/)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    run.add_argument("--out", help="run directory (default runs/<experiment.name>)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--only", action="append", default=[], metavar="STAGE",
                     help="run only these stages (folder names, shell patterns: 'sgd', '*iss*'); repeatable. "
                          "With --resume, several processes can share one run directory")
    dist = sub.add_parser("distill", help="distil a finished run's row (or this run's SGD model) into the config's model")
    dist.add_argument("config", help="a TOML config: its [model] is the student, [sgd] its schedule")
    dist.add_argument("--teacher", required=True, metavar="RUN_DIR[:ROW]",
                      help="a run directory and optionally a method of its results.json (default its last row), or 'self'")
    dist.add_argument("--lam", type=float, default=None, help="weight of the teacher term (default distill.lam)")
    dist.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    dist.add_argument("--out", help="run directory (default runs/<experiment.name>)")
    dist.add_argument("--resume", action="store_true")
    dist.add_argument("--no-progress", action="store_true")
    fit = sub.add_parser("fit", help="one call: fit a sparse ensemble on the config's task and model, choose it on "
                                     "the validation split within a budget, save it, score it on test once")
    fit.add_argument("config", help="a TOML config: [task], [model], and the schedule in [sgd] [sampler] [prior] "
                                    "[prune] [retrain]")
    fit.add_argument("--budget", default="params=1.0", help="cost limit relative to one dense model: params=R, "
                                                              "flops=R, both (comma), or none (default params=1.0)")
    fit.add_argument("--lams", default=None, help="comma-separated group-Lasso strengths to search (default prior.lam)")
    fit.add_argument("--temperatures", default=None, help="comma-separated temperatures (default sampler.temperature)")
    fit.add_argument("--members", default=None, help="comma-separated member counts (default sampler.samples)")
    fit.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    fit.add_argument("--out", help="output directory (default runs/<experiment.name>_fit); rerun to resume")
    fit.add_argument("--no-progress", action="store_true")
    ev = sub.add_parser("evaluate", help="recompute metrics, table and plots of a run directory")
    ev.add_argument("run_dir")
    ev.add_argument("--ood", default=None, metavar="DATASET",
                    help="also score out-of-distribution detection against DATASET's test images (e.g. fashion-mnist)")
    ev.add_argument("--only", action="append", default=[], metavar="STAGE",
                    help="recompute only these stages' rows (shell patterns); the others come from their last evaluation")
    dl = sub.add_parser("download", help="opt-in: fetch a dataset from its canonical mirror (checksum-verified)")
    dl.add_argument("name", choices=sorted([*DATASETS, "cifar10"]))
    dl.add_argument("--dest", help="target directory (default: the user cache)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            cfg = config_mod.load(args.config, args.set)
            out = Path(args.out or Path("runs") / cfg.experiment.name)
            print(f"run directory: {out}")
            pipeline = Pipeline(cfg, out, resume=args.resume, progress=not args.no_progress, overrides=args.set,
                                only=args.only)
            pipeline.run()
            pipeline.ranks.close()  # under torchrun: leave the job together
        elif args.command == "distill":
            overrides = args.set + [f"distill.teacher={_toml_str(args.teacher)}"]
            if args.lam is not None:
                overrides.append(f"distill.lam={args.lam}")
            cfg = config_mod.load(args.config, overrides)
            out = Path(args.out or Path("runs") / cfg.experiment.name)
            print(f"run directory: {out}")
            Pipeline(cfg, out, resume=args.resume, progress=not args.no_progress, overrides=overrides).run()
        elif args.command == "fit":
            from .fit_config import fit_config, parse_budget
            cfg = config_mod.load(args.config, args.set)
            out = Path(args.out or Path("runs") / f"{cfg.experiment.name}_fit")
            grid = lambda text, kind: tuple(kind(v) for v in text.split(",")) if text else None  # noqa: E731
            try:
                lams, temps, members = grid(args.lams, float), grid(args.temperatures, float), grid(args.members, int)
            except ValueError as e:
                raise ConfigError(f"--lams / --temperatures / --members take comma-separated numbers: {e}") from None
            try:
                fit_config(cfg, out, parse_budget(args.budget), lams=lams, temperatures=temps, members=members,
                           progress=not args.no_progress)
            except ValueError as e:  # the recipe's or the work directory's own checks
                if isinstance(e, (ConfigError, MetricInputError)):
                    raise
                raise ConfigError(str(e)) from None
        elif args.command == "evaluate":
            evaluate_run(Path(args.run_dir), run_config(Path(args.run_dir)), ood=args.ood, only=args.only)
        elif args.command == "download":
            fetch = download_cifar10 if args.name == "cifar10" else (lambda dest: download(args.name, dest))
            print(f"saved to {fetch(args.dest)}")
    except (ConfigError, DataError, DivergenceError, RunFileError, MetricInputError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is saved; continue with --resume", file=sys.stderr)
        return 130
    return 0


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


if __name__ == "__main__":
    sys.exit(main())

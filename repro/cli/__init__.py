"""Command line: ``repro run | status | gather | check | list | compare | campaign | unpack | bundle``.

User errors (a bad suite file, a missing dataset, a bad flag) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from pathlib import Path

from repro.errors import UserError
from repro.process import keep_freed_memory


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repro", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite's runs that have no complete record yet; exit 1 when a run failed "
                         "or was left alone because another process (or host) holds its lock")
    run.add_argument("suite", help="suite file (suites/NAME.yaml) or suite name")
    run.add_argument("--tier", default="smoke", help=f"{TIER_HELP} (default smoke)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    run.add_argument("--results", type=Path, default=Path("results"), help=RESULTS_HELP)
    run.add_argument("--force", action="store_true", help="run again even when a complete record exists")
    run.add_argument("--data-dir", type=Path, default=None, help=DATA_DIR_HELP)
    run.add_argument("--no-progress", action="store_true", help="no per-epoch progress bars")
    run.add_argument("--checkpoint-every", default="10m",
                     help="save a resumable training state this often (default 10m); an interrupted run resumes it")
    run.add_argument("--nproc", type=int, default=1,
                     help="data-parallel processes on this machine, started with torchrun (one per GPU; gloo on CPU); "
                     "for suites of task train whose runs set train.micro_batch")
    run.add_argument("--run-id", action="append", default=None, help="run only this run (repeatable)")
    run.add_argument("--seed", action="append", type=int, default=None,
                     help="run only the tier's runs of this seed (repeatable; with --run-id, runs matching both)")
    _add_executor_arguments(run)

    status = sub.add_parser("status", help="each run's state: pending, queued, running, ok, failed, diverged")
    status.add_argument("suite", help="suite file or suite name")
    status.add_argument("--tier", default="smoke", help=f"{TIER_HELP} (default smoke)")
    status.add_argument("--results", type=Path, default=Path("results"), help=RESULTS_HELP)

    gather = sub.add_parser("gather", help="run records -> pandas tables (csv, md), plots and an index")
    gather.add_argument("--results", type=Path, default=Path("results"), help=RESULTS_HELP)
    gather.add_argument("suites", nargs="*", help="suite names or files (default: every suite with records)")

    check = sub.add_parser("check", help="compare results with the suites' references; exit 1 on a failed check")
    check.add_argument("--results", type=Path, default=Path("results"), help=RESULTS_HELP)
    check.add_argument("--strict", action="store_true",
                       help="also exit 1 when a reference is 'not run' or 'incomplete' (use in CI and campaigns)")
    check.add_argument("suites", nargs="*", help="suite names or files (default: every suite with records)")

    compare = sub.add_parser("compare", help="metric deltas between two results folders for the runs they share; "
                             "exit 1 when a setting differs beyond seed noise (or the tolerance, for single runs), "
                             "a run's status changed, or a record or metric of A is missing or unreadable in B")
    compare.add_argument("results_a", type=Path, help="reference results folder (e.g. the committed results/)")
    compare.add_argument("results_b", type=Path, help="results folder to judge (e.g. a fresh run)")
    compare.add_argument("suites", nargs="*", help="suite names or files (default: every suite with records)")
    compare.add_argument("--tolerance", type=float, default=0.5,
                         help="largest |B - A| still accepted where a setting has a single seed in common, in each "
                         "metric's unit (default 0.5: points of top-1)")
    compare.add_argument("--match", choices=("run_id", "setting"), default="run_id",
                         help="pair runs by run id (the same recipe and seed; default), or by suite, tier and setting "
                              "(seed included), to compare two recipes of the same settings, e.g. float32 and bf16")
    compare.add_argument("--confidence", type=float, default=0.95,
                         help="level of the t-interval of the differences paired by seed, where a setting has 2 or "
                         "more seeds in common; 0 within it is 'within noise' (default 0.95)")

    sub.add_parser("list", help="the suites, their tiers and how many runs each expands to")

    campaign = sub.add_parser("campaign", help="spend a time budget on the pending runs of several suites")
    campaign.add_argument("suites", nargs="*", help="suite names or files (default: every suite whose data is here)")
    campaign.add_argument("--tier", default="full",
                          help="a tier every named suite has (each suite's tiers: `repro list`; default full)")
    campaign.add_argument("--budget", default="9m", help="time budget above 0, e.g. 90s, 9m, 1h30m (default 9m)")
    campaign.add_argument("--results", type=Path, default=Path("results"), help=RESULTS_HELP)
    campaign.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    campaign.add_argument("--data-dir", type=Path, default=None, help=DATA_DIR_HELP)
    campaign.add_argument("--archive", type=Path, default=None,
                          help="tar.gz of records, tables, checks, plots and the log, refreshed after every run")
    campaign.add_argument("--plan", action="store_true", help="print the pending runs and estimates; run nothing")
    campaign.add_argument("--json", action="store_true", help="with --plan: one JSON object per suite")
    campaign.add_argument("--plan-device", default=None, help="with --plan: device kind to estimate for, as "
                          "records name it (h200, a100, cpu, ...; default this machine's)")
    campaign.add_argument("--workers", type=int, default=1, help="runs at once, in spawned processes sharing the "
                          "device (default 1); with --plan, the window this takes is estimated too")
    campaign.add_argument("--progress", action="store_true", help="per-epoch progress bars")
    campaign.add_argument("--checkpoint-every", default="10m", help="resumable training state interval (default "
                          "10m); a run is also saved when the deadline stops it")

    unpack = sub.add_parser("unpack", help="merge a campaign archive's records into a results folder")
    unpack.add_argument("archive", type=Path, help="a .tar.gz written by `repro campaign --archive` (at most 16 MiB)")
    unpack.add_argument("--results", type=Path, default=Path("results"), help="results folder to merge into "
                        "(default results/)")

    bundle = sub.add_parser("bundle", help="wheels, data and source commit for a GPU box that has only PyTorch")
    bundle.add_argument("out", type=Path, help="a new (or empty) folder for the bundle")
    bundle.add_argument("--dataset", action="append", default=None,
                        help="dataset whose files to include: fashion_mnist, the only one that ships as files small "
                        "enough to carry (default: fashion_mnist)")
    bundle.add_argument("--data-dir", type=Path, default=None, help=f"{DATA_DIR_HELP}, else Debian's copy")
    bundle.add_argument("--python-version", default="3.12", help="target CPython (default 3.12)")
    bundle.add_argument("--platform", action="append", default=None,
                        help="target platform tag (repeatable; default: manylinux x86-64 tags)")
    return parser


TIER_HELP = "a tier of the suite (each suite's tiers: `repro list`)"
RESULTS_HELP = "results folder (default results/)"
DATA_DIR_HELP = "folder holding local dataset copies (default: REPRO_DATA_DIR)"


#: ``repro run``'s flags (as argparse names them) that only the Slurm executor reads
SLURM_FLAGS = ("wait", "poll_every", "dry_run", "cluster", "partition", "time", "gpus_per_node", "cpus_per_task",
               "mem", "sbatch_option")
DEFAULT_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                     "manylinux2014_x86_64"]


def _add_executor_arguments(run: argparse.ArgumentParser) -> None:
    where = run.add_argument_group("where runs execute (see README, 'Running a suite on a Slurm cluster')")
    where.add_argument("--executor", choices=("local", "slurm"), default="local",
                       help="local: this machine (default); slurm: one job per run through submitit")
    where.add_argument("--workers", type=int, default=1,
                       help="local: runs at once in separate processes, one GPU each or sharing the device "
                       "(default 1)")
    where.add_argument("--wait", action="store_true", help="slurm: return when every submitted job has ended")
    where.add_argument("--poll-every", default=None, metavar="DURATION",
                       help="slurm --wait: how often to ask the scheduler, e.g. 5s (default 30s)")
    where.add_argument("--dry-run", action="store_true", help="slurm: print the sbatch scripts, submit nothing")
    where.add_argument("--cluster", type=Path, default=None, help="slurm: a YAML file with a 'cluster:' block")
    where.add_argument("--partition", default=None, help="slurm: the partition the jobs go to")
    where.add_argument("--time", type=int, default=None, help="slurm: minutes per job")
    where.add_argument("--gpus-per-node", type=int, default=None,
                       help="slurm: GPUs per job of a one-process run (a run with --nproc N gets N)")
    where.add_argument("--cpus-per-task", type=int, default=None, help="slurm: CPU cores per job")
    where.add_argument("--mem", type=float, default=None, help="slurm: memory per job in GB, a finite number above 0")
    where.add_argument("--sbatch-option", action="append", default=[], metavar="KEY=VALUE",
                       help="slurm: extra sbatch option, e.g. account=mylab (repeatable)")


def _submit(args: argparse.Namespace, request) -> int:
    from repro.execute.plan import parse_duration
    from repro.execute.slurm import SlurmExecutor, cluster_config, parse_sbatch_options

    cluster = cluster_config(args.cluster, {
        "partition": args.partition, "time": args.time, "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem,
        "sbatch_options": parse_sbatch_options(args.sbatch_option)})
    poll_s = (parse_duration(args.poll_every, "--poll-every") if args.poll_every
              else 1.0 if cluster.scheduler == "local" else 30.0)
    if poll_s <= 0:
        raise UserError(f"--poll-every {args.poll_every}: allowed: a duration above 0, such as 5s")
    summary = SlurmExecutor(cluster, args.dry_run, args.wait, poll_s).run(request)
    if args.dry_run:
        return 0
    if not args.wait:
        print(f"{summary.suite} ({summary.tier}): {len(summary.submitted)} submitted, {len(summary.skipped)} "
              f"complete, queued or running; `repro status {summary.suite} --tier {summary.tier}` follows them")
        return 0
    print(f"{summary.suite} ({summary.tier}): {len(summary.ran)} ran, {len(summary.skipped)} skipped, "
          f"{len(summary.diverged)} diverged, {len(summary.failed)} failed")
    return 1 if summary.failed else 0


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command in ``nproc`` processes under torchrun (``--`` keeps torchrun from reading its flags)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "repro", "--", *argv]
    return subprocess.run(command, check=False).returncode


def _cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from repro.execute.base import SuiteRequest
    from repro.execute.local import SequentialExecutor, WorkerExecutor
    from repro.execute.plan import parse_duration
    from repro.execute.runner import check_data_parallel, resolve_device
    from repro.train.distributed import init_data_parallel, under_torchrun

    started = int(os.environ["WORLD_SIZE"]) if under_torchrun() else 1
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    slurm_only = next((name for name in SLURM_FLAGS if getattr(args, name) not in (None, False, [])), None)
    if args.executor == "local" and slurm_only:
        raise UserError(f"--{slurm_only.replace('_', '-')}: applies to --executor slurm")
    if args.workers > 1 and args.nproc > 1:
        raise UserError(f"--workers {args.workers}: a run with --nproc {args.nproc} already uses several processes; "
                        "pass one of them")
    if args.executor == "slurm" and args.workers > 1:
        raise UserError(f"--workers {args.workers}: applies to --executor local; on Slurm each run is a job")
    request = SuiteRequest(args.suite, args.tier, args.device, args.results, args.data_dir, args.force,
                           not args.no_progress, args.nproc, _selected_run_ids(args),
                           parse_duration(args.checkpoint_every, "--checkpoint-every"))
    if args.executor == "slurm":
        return _submit(args, request)
    if started > 1 and started != args.nproc:
        raise UserError(f"--nproc {args.nproc}: torchrun started {started} processes; pass --nproc {started}")
    device = resolve_device(args.device)
    data_parallel = None
    if args.nproc > 1:
        check_data_parallel(args.suite, args.tier, args.nproc)
        if started == 1:
            return _launch_torchrun(args.nproc, argv)
        data_parallel = init_data_parallel(use_cuda=device.type == "cuda")
    try:
        executor = WorkerExecutor(args.workers) if args.workers > 1 else SequentialExecutor(data_parallel)
        summary = executor.run(request)
    finally:
        if data_parallel is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if data_parallel is not None and not data_parallel.is_main:
        return 0
    locked = f" ({len(summary.locked)} locked by another process: see above)" if summary.locked else ""
    print(f"{summary.suite} ({summary.tier}): {len(summary.ran)} ran, {len(summary.skipped)} skipped{locked}, "
          f"{len(summary.diverged)} diverged, {len(summary.failed)} failed")
    return 1 if summary.failed or summary.locked else 0


def _selected_run_ids(args: argparse.Namespace) -> tuple[str, ...] | None:
    """``--run-id`` and ``--seed`` as the run ids to run (None: all of the tier's)."""
    if args.seed is None:
        return None if args.run_id is None else tuple(args.run_id)
    from repro.execute.runner import expand_tier

    _, path, runs = expand_tier(args.suite, args.tier)
    seeds = {run.setting["seed"] for run in runs}
    unknown = sorted(set(args.seed) - seeds)
    if unknown:
        allowed = ", ".join(map(str, sorted(seeds)))
        raise UserError(f"{path}: --seed {unknown[0]}: tier {args.tier} runs seeds {allowed}")
    return tuple(run.run_id for run in runs if run.setting["seed"] in args.seed
                 and (args.run_id is None or run.run_id in args.run_id))


def _cmd_status(args: argparse.Namespace) -> int:
    from repro.execute.jobs import run_states, status_lines
    from repro.execute.runner import expand_tier

    suite, _, runs = expand_tier(args.suite, args.tier)
    print(f"suite {suite.name} v{suite.version}, tier {args.tier}: {len(runs)} runs")
    print("\n".join(status_lines(run_states(suite.name, runs, args.results))))
    return 0


def _suite_refs(suites: list[str]) -> list[str] | None:
    """Suite arguments as gather and check take them: a suite file that exists as given (one outside suites/),
    else the suite's name; None for all the suites with records."""
    return [s if Path(s).is_file() else Path(s).stem for s in suites] or None


def _cmd_gather(args: argparse.Namespace) -> int:
    from repro.results.gather import gather

    for results, paths in gather(args.results, _suite_refs(args.suites)):
        stale = f" ({results.stale} stale records of an older version or recipe ignored)" if results.stale else ""
        runs = results.frame["run_id"].nunique() if not results.frame.empty else 0
        print(f"{results.name}: {runs} runs{stale}")
        print(paths[-1 if results.frame.empty else 1].read_text())
        for path in paths:
            print(f"  wrote {path}")
    print(f"wrote {args.results / 'README.md'}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from repro.results.check import STATUSES, failing, report_frame
    from repro.results.gather import run_checks, stale_counts
    from repro.results.tables import markdown

    names = _suite_refs(args.suites)
    results = run_checks(args.results, names)
    for name, count in stale_counts(args.results, names).items():
        print(f"{name}: {count} stale records (an older version or recipe) ignored")
    if not results:
        print(f"no references to check in {args.results}")
        return 1 if args.strict else 0
    print(markdown(report_frame(results)))
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    for status in ("fail", "inconclusive", "by construction"):
        listed = [r for r in results if r.status == status]
        if listed:
            print(f"\n{status}:")
            for r in listed:
                print(f"  {r.suite} {r.tier} {r.reference}: {_verdict_line(r)}")
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['inconclusive']} inconclusive, "
          f"{counts['by construction']} by construction, {counts['not run']} not run, "
          f"{counts['incomplete']} incomplete")
    return 1 if failing(results, strict=args.strict) else 0


def _verdict_line(result) -> str:
    """n, mean ± SE and the interval against the bound: what decided a verdict, on one line."""
    if result.reproduced is None:
        return result.detail
    se = "" if result.se is None else f" ± {result.se:.2f} SE"
    spread = "no interval" if result.low is None else (
        f"{result.confidence:.0%} CI [{result.low:.2f}, {result.high:.2f}]")
    decide = f"; ~{result.seeds_to_decide} seeds would decide it" if result.seeds_to_decide else ""
    return f"n {result.n}, {result.reproduced:.2f}{se}, {spread} vs {result.tolerance}{decide}"


def _cmd_compare(args: argparse.Namespace) -> int:
    from repro.results.compare import compare, report

    comparison = compare(args.results_a, args.results_b, tolerance=args.tolerance, confidence=args.confidence,
                         match=args.match, suites=[Path(s).stem for s in args.suites] or None)
    print(report(comparison, args.results_a, args.results_b))
    return 1 if comparison.verdict == "differs" else 0


def _minutes(expected: float | None) -> str:
    return "" if expected is None else f" (~{expected:g} min on 2 CPU cores)"


def _cmd_list(_: argparse.Namespace) -> int:
    from repro.suite import expand, list_suite_files, load_suite

    rows = []
    for path in list_suite_files():
        suite, _ = load_suite(path)
        tiers = ", ".join(f"{tier}: {len(expand(suite, tier))} runs{_minutes(spec.expected_minutes)}"
                          for tier, spec in suite.tiers.items())
        rows.append(f"{suite.name:<28} v{suite.version}  {suite.task:<8} {tiers}")
    print("\n".join(rows) if rows else "no suites found")
    return 0


def _campaign_suites(names: list[str]) -> list[str]:
    from repro.suite import list_suite_files

    return names or [path.stem for path in list_suite_files()]


def _cmd_campaign(args: argparse.Namespace) -> int:
    import json

    from repro.execute.campaign import Campaign
    from repro.execute.plan import order_runs, parse_duration, window_seconds
    from repro.results.check import failing

    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    for flag, given in (("--json", args.json), ("--plan-device", args.plan_device)):
        if given and not args.plan:
            raise UserError(f"{flag}: applies to --plan")
    budget_s = parse_duration(args.budget)
    if budget_s <= 0:
        raise UserError(f"--budget {args.budget!r}: must be more than 0, e.g. 9m")
    campaign = Campaign(_campaign_suites(args.suites), args.tier, budget_s, args.results,
                        device=args.device, data_dir=args.data_dir, archive=args.archive, progress=args.progress,
                        checkpoint_every_s=parse_duration(args.checkpoint_every, "--checkpoint-every"),
                        workers=args.workers)
    if args.plan:
        kind = args.plan_device or campaign.executor_kind
        suite_plans = campaign.plans(kind)
        plans = [plan.as_dict(kind) for plan in suite_plans]
        ready = [plan for plan in suite_plans if not plan.skipped_reason]
        window = window_seconds(order_runs(ready), args.workers) / 60
        if args.json:
            print("\n".join(json.dumps(plan) for plan in plans))
            print(json.dumps({"total_minutes": round(sum(p["estimated_minutes"] for p in plans if not p["skipped"]),
                                                     2), "workers": args.workers, "window_minutes": round(window, 2)}))
            return 0
        for plan in plans:
            state = f"  data not present: {plan['skipped'][:80]}" if plan["skipped"] else ""
            print(f"{plan['suite']:<24} {plan['tier']:<6} {plan['pending_runs']:>4} pending "
                  f"{plan['estimated_minutes']:>9.1f} min on {kind}  ({'; '.join(plan['estimate_basis'])}){state}")
        total = sum(plan["estimated_minutes"] for plan in plans if not plan["skipped"])
        print(f"total: {total:.1f} device-minutes on {kind} for the suites whose data is here")
        if args.workers > 1:
            print(f"on {args.workers} workers: {window:.1f} min, if each run takes its estimate beside "
                  f"{args.workers - 1} others")
        return 0
    summary = campaign.run()
    lost = f", {len(summary.lost)} lost with their worker process" if summary.lost else ""
    print(f"campaign: {len(summary.ran)} ran ({summary.statuses}), {len(summary.not_started)} not started, "
          f"{len(summary.stopped_at_deadline)} stopped at the deadline with a resumable checkpoint{lost}")
    return 1 if summary.statuses.get("failed") or summary.lost or failing(campaign.checks, strict=False) else 0


def _cmd_unpack(args: argparse.Namespace) -> int:
    from repro.execute.archive import unpack

    summary = unpack(args.archive, args.results)
    for line in summary.refused:
        print(f"refused {line}", file=sys.stderr)
    print(f"{args.archive}: {len(summary.added)} records added, {len(summary.kept)} kept (complete already), "
          f"{len(summary.refused)} refused -> {args.results}; run `repro gather` and `repro check` next")
    return 1 if summary.refused else 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    from repro.execute.bundle import write_bundle

    source = write_bundle(args.out, datasets=args.dataset or ["fashion_mnist"], data_dir=args.data_dir,
                          python_version=args.python_version, platforms=args.platform or DEFAULT_PLATFORMS,
                          repo=Path(__file__).resolve().parents[2])
    print(f"{args.out}: {len(source['wheels'])} wheels, {len(source['data'])} data files, "
          f"{source['bytes'] / 2**20:.1f} MiB, commit {source['git_commit']}")
    print(f"on the box: pip install --no-index --no-deps --target SITE {args.out}/wheels/*.whl; "
          f"PYTHONPATH=SITE REPRO_SOURCE_FILE={args.out}/source.json python -m repro ... --data-dir {args.out}/data")
    return 0


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    commands = {"run": functools.partial(_cmd_run, argv=argv), "status": _cmd_status, "gather": _cmd_gather,
                "check": _cmd_check, "list": _cmd_list, "compare": _cmd_compare, "campaign": _cmd_campaign,
                "unpack": _cmd_unpack, "bundle": _cmd_bundle}
    try:
        return commands[args.command](args)
    except UserError as err:
        print(f"repro: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130


def _interrupted(args: argparse.Namespace) -> str:
    """The one line Ctrl-C prints: for ``repro run``, how many of its runs have a complete record (kept: the
    same command skips them)."""
    if args.command != "run":
        return "interrupted"
    from repro.execute.runner import expand_tier
    from repro.store.records import is_current, read_record, record_path

    try:
        suite, _, runs = expand_tier(args.suite, args.tier)
    except (UserError, KeyboardInterrupt):
        return "interrupted; the same command resumes"
    complete = sum(is_current(read_record(record_path(args.results, suite.name, run.run_id), warn=False),
                              run.shared_with)
                   for run in runs)
    return f"interrupted: {complete} runs complete; the same command resumes"

"""``repro campaign``: a time budget spent on the pending runs of several suites."""

from __future__ import annotations

import argparse
from pathlib import Path

from repro.cli.common import DATA_DIR_HELP, RESULTS_HELP, add_executor_arguments, check_executor_flags, slurm_executor
from repro.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    campaign.add_argument("--plan-device", default=None, help="device kind to estimate for, as records name it "
                          "(h200, a100, cpu, ...; default this machine's); with --plan, or required with --executor "
                          "slurm")
    campaign.add_argument("--progress", action="store_true", help="per-epoch progress bars")
    campaign.add_argument("--checkpoint-every", default="10m", help="resumable training state interval (default "
                          "10m); a run is also saved when the deadline stops it")
    add_executor_arguments(campaign, "slurm: how often to ask the scheduler whether a job has ended, e.g. 5s "
                           "(default 30s)")


def _campaign_suites(names: list[str]) -> list[str]:
    from repro.suite import list_suite_files

    return names or [path.stem for path in list_suite_files()]


def handle(args: argparse.Namespace) -> int:
    import json

    from repro.execute.campaign import Campaign
    from repro.execute.local import SequentialExecutor, WorkerExecutor
    from repro.execute.plan import order_runs, parse_duration, window_seconds
    from repro.results.check import failing

    check_executor_flags(args)
    for flag, given in (("--json", args.json), ("--plan-device", args.plan_device and args.executor == "local")):
        if given and not args.plan:
            raise UserError(f"{flag}: applies to --plan" + (" or --executor slurm" if flag == "--plan-device" else ""))
    budget_s = parse_duration(args.budget, above_zero=True)
    if args.executor == "slurm":
        executor = slurm_executor(args)
    else:
        executor = WorkerExecutor(args.workers) if args.workers > 1 else SequentialExecutor()
    campaign = Campaign(_campaign_suites(args.suites), args.tier, budget_s, args.results,
                        device=args.device, data_dir=args.data_dir, archive=args.archive, progress=args.progress,
                        checkpoint_every_s=parse_duration(args.checkpoint_every, "--checkpoint-every"),
                        executor=executor, kind=args.plan_device)
    if args.plan:
        kind = campaign.executor_kind
        suite_plans = campaign.plans(kind)
        plans = [plan.as_dict(kind) for plan in suite_plans]
        ready = [plan for plan in suite_plans if not plan.skipped_reason]
        slots = executor.slots
        window = window_seconds(order_runs(ready), slots) / 60
        if args.json:
            print("\n".join(json.dumps(plan) for plan in plans))
            print(json.dumps({"total_minutes": round(sum(p["estimated_minutes"] for p in plans if not p["skipped"]),
                                                     2), "workers": slots, "window_minutes": round(window, 2)}))
            return 0
        for plan in plans:
            state = f"  data not present: {plan['skipped'][:80]}" if plan["skipped"] else ""
            print(f"{plan['suite']:<24} {plan['tier']:<6} {plan['pending_runs']:>4} pending "
                  f"{plan['estimated_minutes']:>9.1f} min on {kind}  ({'; '.join(plan['estimate_basis'])}){state}")
        total = sum(plan["estimated_minutes"] for plan in plans if not plan["skipped"])
        print(f"total: {total:.1f} device-minutes on {kind} for the suites whose data is here")
        if slots > 1:
            print(f"{slots} runs at once: {window:.1f} min, if each run takes its estimate beside {slots - 1} others")
        return 0
    summary = campaign.run()
    lost = f", {len(summary.lost)} lost with their worker process" if summary.lost else ""
    cancelled = f", {len(summary.cancelled)} jobs cancelled at the deadline" if summary.cancelled else ""
    print(f"campaign: {len(summary.ran)} ran ({summary.statuses}), {len(summary.not_started)} not started, "
          f"{len(summary.stopped_at_deadline)} stopped at the deadline with a resumable checkpoint{lost}{cancelled}")
    return 1 if summary.statuses.get("failed") or summary.lost or failing(campaign.checks, strict=False) else 0

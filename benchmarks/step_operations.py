"""Device operations and host round trips of one training step, per normalizer and micro-batch, counted on the meta
device (``repro.train.operations``): what a launch-bound GPU step costs, measured without a GPU.

    python benchmarks/step_operations.py --out step_operations.md
    python benchmarks/step_operations.py --normalizers cbn --micro-batches 2 --by-name
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from repro.train.operations import training_step_operations

SUITE = Path(__file__).resolve().parent.parent / "suites" / "fmnist-microbatch.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--normalizers", nargs="+", help="default: fmnist-microbatch's, with its options")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--batch", type=int, default=32, help="optimizer batch (default: 32, fmnist-microbatch's)")
    parser.add_argument("--by-name", action="store_true", help="also list each step's operations by name")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    return parser.parse_args()


def suite_normalizers() -> dict[str, dict]:
    entries = yaml.safe_load(SUITE.read_text())["normalizers"]
    return {e if isinstance(e, str) else e["name"]: {} if isinstance(e, str) else e.get("options", {})
            for e in entries}


def main() -> None:
    args = parse_args()
    known = suite_normalizers()

    def count(name: str, micro_batch: int | None):
        train = {"epochs": 1, "batch_size": args.batch, "lr": 0.1, "micro_batch": micro_batch}
        return training_step_operations(args.backbone, name, json.dumps(known.get(name, {}), sort_keys=True), True,
                                        (1, 28, 28), 10, json.dumps(train))

    plain = count("bn", None).device_operations
    lines = [f"{args.backbone}, 1×28×28 (CIFAR stem), optimizer batch {args.batch}, channels-last, SGD (foreach), "
             f"steady state; per step. Plain BN: {plain:g} operations.", "",
             "| normalizer | micro-batch | device operations | × plain BN | host round trips |",
             "|---|---|---|---|---|"]
    details = []
    for name in args.normalizers or list(known):
        for micro_batch in args.micro_batches:
            ops = count(name, micro_batch)
            lines.append(f"| {name} | {micro_batch} | {ops.device_operations:g} | {ops.device_operations / plain:.2f} "
                         f"| {ops.host_round_trips:g} |")
            if args.by_name:
                details.append(f"{name} at {micro_batch}: " + ", ".join(f"{op} {n}" for op, n in ops.by_name)
                               + (f"; round trips: {dict(ops.round_trips_by_name)}" if ops.host_round_trips else ""))
    text = "\n".join([*lines, *(["", *details] if details else [])]) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

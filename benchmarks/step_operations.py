"""Device operations and host round trips of one training step, per normalizer and micro-batch, counted on the meta
device (``repro.train.operations``): what a launch-bound GPU step costs, measured without a GPU.

With ``--device``, each step is also timed there as the trainer runs it (micro-batches in one pass, channels-last,
bf16 autocast and the fused SGD on CUDA), in alternating rounds, the device synchronized only around each round's
steps: the time per operation tells whether a step's time does grow with its operations, which is what the time
estimates assume on accelerators (``repro.tasks.workload.step_pass_weight``).

    python benchmarks/step_operations.py --out step_operations.md
    python benchmarks/step_operations.py --normalizers cbn --micro-batches 2 --by-name
    python benchmarks/step_operations.py --device cuda --out step_operations_cuda.md
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from repro.models import build_model
from repro.norms.ghost import can_run_in_one_pass
from repro.store.provenance import device_name
from repro.train.config import TrainConfig
from repro.train.loop import _forward_backward, make_optimizer, synchronize
from repro.train.operations import training_step_operations

SUITE = Path(__file__).resolve().parent.parent / "suites" / "fmnist-microbatch.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--normalizers", nargs="+", help="default: fmnist-microbatch's, with its options")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--batch", type=int, default=32, help="optimizer batch (default: 32, fmnist-microbatch's)")
    parser.add_argument("--image-size", type=int, default=28, help="pixels (default: 28); a small size on the CPU "
                        "leaves the host's work per operation, what a launch-bound GPU step is made of")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default: 1)")
    parser.add_argument("--by-name", action="store_true", help="also list each step's operations by name")
    parser.add_argument("--device", help="also time each step on this device (cpu, cuda)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round (default: 20)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the fastest is kept (default: 3)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    return parser.parse_args()


def suite_normalizers() -> dict[str, dict]:
    entries = yaml.safe_load(SUITE.read_text())["normalizers"]
    return {e if isinstance(e, str) else e["name"]: {} if isinstance(e, str) else e.get("options", {})
            for e in entries}


def timed_step(name: str, options: dict, micro_batch: int, args: argparse.Namespace, device: torch.device
               ) -> Callable[[int], float]:
    """A fresh model's training step as the trainer takes it; the returned function runs n steps and returns the
    seconds they took, the device synchronized before and after."""
    torch.manual_seed(0)
    model = build_model(args.backbone, name, num_classes=10, in_chans=1, small_input=True, **options).to(device)
    model.to(memory_format=torch.channels_last).train()
    cfg = TrainConfig(epochs=1, batch_size=args.batch, lr=0.01, micro_batch=micro_batch)
    norm = model.normalizer
    norm.before_training(model, 1)
    optimizer = make_optimizer(model, cfg, fused=device.type == "cuda" or None)
    images = torch.randn(args.batch, 1, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    one_pass = can_run_in_one_pass(model)
    generator = torch.Generator(device=device)

    def run(steps: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            _forward_backward(model, images, labels, cfg, device, generator, one_pass)
            optimizer.step()
            norm.after_step(model)
        synchronize(device)
        return time.perf_counter() - start

    first, period = norm.step_pattern(1)
    run(first + period + 3)  # burn-in over, windows full, kernels chosen
    return run


def main() -> None:
    args = parse_args()
    known = suite_normalizers()
    names = args.normalizers or list(known)

    def count(name: str, micro_batch: int | None):
        train = {"epochs": 1, "batch_size": args.batch, "lr": 0.1, "micro_batch": micro_batch}
        return training_step_operations(args.backbone, name, json.dumps(known.get(name, {}), sort_keys=True), True,
                                        (1, args.image_size, args.image_size), 10, json.dumps(train))

    plain = count("bn", None).device_operations
    settings = [(name, micro_batch) for name in names for micro_batch in args.micro_batches]
    seconds: dict[tuple[str, int], float] = {}
    if args.device:
        device = torch.device(args.device)
        torch.set_num_threads(args.threads)
        steps = {(name, micro_batch): timed_step(name, known.get(name, {}), micro_batch, args, device)
                 for name, micro_batch in settings}
        for _ in range(args.rounds):
            for setting, run in steps.items():
                seconds[setting] = min(seconds.get(setting, float("inf")), run(args.steps) / args.steps)
    timed = (f"; timed on {device_name(torch.device(args.device))}"
             + (f" ({args.threads} thread(s))" if args.device == "cpu" else "")
             + f", fastest of {args.rounds} rounds of {args.steps} steps" if args.device else "")
    size = f"1×{args.image_size}×{args.image_size}"
    lines = [f"{args.backbone}, {size} (CIFAR stem), optimizer batch {args.batch}, channels-last, SGD (foreach), "
             f"steady state; per step. Plain BN: {plain:g} operations{timed}.", "",
             "| normalizer | micro-batch | device operations | × plain BN | host round trips |"
             + (" ms per step | µs per operation |" if args.device else ""),
             "|---|---|---|---|---|" + ("---|---|" if args.device else "")]
    details = []
    for name, micro_batch in settings:
        ops = count(name, micro_batch)
        line = (f"| {name} | {micro_batch} | {ops.device_operations:g} | {ops.device_operations / plain:.2f} "
                f"| {ops.host_round_trips:g} |")
        if args.device:
            step = seconds[name, micro_batch]
            line += f" {1000 * step:.2f} | {1e6 * step / ops.device_operations:.1f} |"
        lines.append(line)
        if args.by_name:
            details.append(f"{name} at {micro_batch}: " + ", ".join(f"{op} {n}" for op, n in ops.by_name)
                           + (f"; round trips: {dict(ops.round_trips_by_name)}" if ops.host_round_trips else ""))
    text = "\n".join([*lines, *(["", *details] if details else [])]) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

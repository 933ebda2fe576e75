"""Cross-Iteration BN's training step next to BatchNorm's: time per step.

A step is one optimizer batch of ``--batch`` images at ``--micro-batch`` images per micro-batch, all micro-batches
in one pass (``repro.norms.ghost``), then SGD and the normalizer's ``after_step``; CBN's windows are full. The
normalizers take turns step by step for ``--rounds`` rounds, so that other load on the machine slows each alike;
the fastest and the median step are reported. The operations a GPU step launches, which on a GPU are the guide,
are counted without one by ``benchmarks/step_operations.py``.

    python benchmarks/cbn_step.py --backbone resnet20 --batch 32 --micro-batch 8
    python benchmarks/cbn_step.py --device cuda --backbone resnet18 --batch 32 --micro-batch 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from repro.models import build_model
from repro.norms.ghost import ghost_batches
from repro.process import malloc_setting
from repro.store.provenance import device_name

NORMALIZERS = {"bn": {}, "cbn": {"window": 4}, "cbn_naive": {"window": 4}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default: 1)")
    parser.add_argument("--contiguous", action="store_true",
                        help="NCHW tensors instead of channels-last (the trainer's default, on the CPU too)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it starts instead of as repro's commands set it (repro.process)")
    return parser.parse_args()


def training_step(normalizer: str, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    """A step function of a fresh model."""
    torch.manual_seed(0)
    model = build_model(args.backbone, normalizer, num_classes=10, in_chans=1, small_input=True,
                        **NORMALIZERS[normalizer]).to(device).train()
    memory_format = torch.contiguous_format if args.contiguous else torch.channels_last
    model.to(memory_format=memory_format)
    model.normalizer.before_training(model, 100)
    images = torch.randn(args.batch, 1, 28, 28, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad()
        with ghost_batches(model, args.micro_batch):
            F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        model.normalizer.after_step(model)

    return step


def main() -> None:
    args = parse_args()
    malloc = malloc_setting(keep=not args.default_malloc)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    steps = {name: training_step(name, args, device) for name in NORMALIZERS}
    for step in steps.values():
        for _ in range(7):  # past CBN's burn-in, windows full
            step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(clock() - start)
    print(f"{args.backbone}, batch {args.batch}, micro-batch {args.micro_batch}, on {device_name(device)}"
          + (f", {args.threads} thread(s), CPU time" if device.type == "cpu" else ", wall time") + f", {malloc}"
          + (", NCHW" if args.contiguous else ", channels-last"))
    print("| normalizer | fastest ms/step | vs BN | median ms/step | vs BN |")
    print("|---|---|---|---|---|")
    fastest_bn, median_bn = min(times["bn"]), statistics.median(times["bn"])
    for name, values in times.items():
        fastest, median = min(values), statistics.median(values)
        print(f"| {name} | {1000 * fastest:.1f} | {fastest / fastest_bn:.2f}x | {1000 * median:.1f} | "
              f"{median / median_bn:.2f}x |")


if __name__ == "__main__":
    main()

"""Training-step cost of each normalizer next to BatchNorm, on one micro-batch, for one backbone.

Every normalizer is timed on the same random batch with ``repro.train.timing.measure_step_time`` (SGD step plus the
normalizer's ``after_step``; CBN past its burn-in, with its windows filled). The normalizers are timed in turns,
``--rounds`` times, and each one's fastest round is kept, so that a busy machine slows every normalizer alike.
Prints a markdown table; CPU time per step is shown too (on CPU it is steadier than wall time on a shared machine).

    python benchmarks/step_time.py --backbone resnet18 --micro-batch 8 --out step_time_cpu.md
    python benchmarks/step_time.py --device cuda --micro-batch 32 --image-size 224 --in-chans 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from repro.models import build_model
from repro.store.provenance import device_name
from repro.train.timing import measure_step_time

NORMALIZERS = ("bn", "gn", "brn", "cbn", "cbn_naive", "mimicnorm", "fixup", "none")
OPTIONS = {"gn": {"group_size": 16}, "cbn": {"window": 4}, "cbn_naive": {"window": 4}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--micro-batch", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all normalizers (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default: 1)")
    parser.add_argument("--normalizers", nargs="+", default=list(NORMALIZERS))
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = {name: build_model(args.backbone, name, num_classes=10, in_chans=args.in_chans,
                                small_input=args.image_size < 64, **OPTIONS.get(name, {}))
              for name in args.normalizers}
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            timing = measure_step_time(model, batch_size=args.micro_batch, image_size=args.image_size,
                                       in_chans=args.in_chans, num_classes=10, device=device, steps=args.steps)
            wall, cpu = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(wall, timing.median_ms), min(cpu, timing.median_cpu_ms))
    bn_wall, bn_cpu = best.get("bn", (float("nan"), float("nan")))
    lines = [f"{args.backbone}, {args.micro_batch} images of {args.image_size}px per step, {device_name(device)}, "
             f"{args.threads} thread(s), best of {args.rounds} rounds of {args.steps} steps", "",
             "| normalizer | wall ms/step | × BN (wall) | CPU ms/step | × BN (CPU) |", "|---|---|---|---|---|"]
    for name, (wall, cpu) in best.items():
        lines.append(f"| {name} | {wall:.1f} | {wall / bn_wall:.2f} | {cpu:.1f} | {cpu / bn_cpu:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()

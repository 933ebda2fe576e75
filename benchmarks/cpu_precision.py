"""Training-step time on the CPU in float32 and under bf16 autocast (``TrainConfig.amp_cpu``), per normalizer.

ResNet-20 (small input, 1 channel, 10 classes, channels-last) on one random batch, each step the trainer's own:
``zero_grad``, ``repro.train.loop._forward_backward`` with a ``TrainConfig``, the recipe's SGD step and the
normalizer's ``after_step``. Each (normalizer, precision) pair has its own model; the pairs are timed in turns,
``--rounds`` times, and each one's fastest round is kept, so that other load on the machine slows both precisions
alike and the ratio stays meaningful even where absolute times do not. bf16 pays off only where the CPU has native
bf16 arithmetic (AVX512-BF16 or AMX): the header says whether this one has it.

    python benchmarks/cpu_precision.py                      # bn, gn (8 groups), none, mimicnorm, fixup, brn
    python benchmarks/cpu_precision.py --normalizers bn gn --threads 2 --rounds 7

Prints a markdown table: ms per step in float32 and in bf16, and float32 / bf16 (above 1: bf16 is faster).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from repro.models import build_model
from repro.store.provenance import device_name
from repro.train import TrainConfig, seed_everything
from repro.train.loop import _forward_backward, make_optimizer

NORMALIZERS = ("bn", "gn", "none", "mimicnorm", "fixup", "brn")
OPTIONS = {"gn": {"groups": 8}}  # fmnist-baseline's laptop tier: 2 channels per group in the 16-channel stage
CPU = torch.device("cpu")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--normalizers", nargs="+", default=list(NORMALIZERS))
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--batch", type=int, default=128, help="images per step (default: 128, the laptop recipe's)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (default: 3)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the fastest is kept (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    return parser.parse_args()


def cpu_bf16_flags() -> str:
    """The CPU's native bf16 instruction sets, from /proc/cpuinfo (Linux); 'none' or 'unknown' otherwise."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    native = sorted({flag for flag in flags.split() if flag in ("avx512_bf16", "amx_bf16")})
    return ", ".join(native) or "none"


def training_step(normalizer: str, cfg: TrainConfig, args: argparse.Namespace, total_steps: int):
    """One trainer step on a fresh model of ``normalizer`` with ``cfg``'s precision, as a function to time."""
    seed_everything(0)
    model = build_model(args.backbone, normalizer, num_classes=10, in_chans=1, small_input=True,
                        **OPTIONS.get(normalizer, {}))
    model.to(memory_format=torch.channels_last).train()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 1, 28, 28, generator=generator).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,), generator=generator)
    model.normalizer.before_training(model, total_steps)
    optimizer = make_optimizer(model, cfg)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _forward_backward(model, images, labels, cfg, CPU, generator)
        optimizer.step()
        model.normalizer.after_step(model)

    return step


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    # a small learning rate: random labels must not drive fixup or none into overflow, whose arithmetic is slower
    recipe = {"epochs": 1, "batch_size": args.batch, "lr": 0.01}
    precisions = {"float32": TrainConfig(**recipe), "bf16": TrainConfig(**recipe, amp_cpu=True)}
    total_steps = 1 + args.rounds * args.steps
    steps = {(name, precision): training_step(name, cfg, args, total_steps)
             for name in args.normalizers for precision, cfg in precisions.items()}
    for step in steps.values():
        step()  # untimed: first-call allocations and kernel selection
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(args.rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            best[key] = min(best[key], 1000 * (time.perf_counter() - start) / args.steps)
    lines = [f"{args.backbone}, batch {args.batch} of 28x28x1, channels-last, {device_name(CPU)} (native bf16: "
             f"{cpu_bf16_flags()}), {args.threads} thread(s), torch {torch.__version__}, fastest of {args.rounds} "
             f"alternating rounds of {args.steps} steps", "",
             "| normalizer | float32 ms/step | bf16 ms/step | float32 / bf16 |", "|---|---|---|---|"]
    for name in args.normalizers:
        fp32, bf16 = best[name, "float32"], best[name, "bf16"]
        lines.append(f"| {name} | {fp32:.1f} | {bf16:.1f} | {fp32 / bf16:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()

"""Throughput of repro's trainer and TTA evaluator next to bare PyTorch loops, in one process.

Four tables, each a ratio measured within this process (the machine's other load slows both sides alike; each
configuration is timed in alternating rounds and its fastest round kept):

1. micro-batch steps: the sequential per-micro-batch passes against the one-pass ghost-batch path
   (``repro.norms.ghost``), per normalizer and micro-batch, at a fixed optimizer batch;
2. the trainer (``train_and_evaluate``, progress off) against a bare loop (index, normalize, forward, loss,
   backward, SGD step) on the same model, batch, precision (bf16 autocast and channels-last on CUDA) and device;
   with ``--compile MODE``, also the bare loop with its model through ``torch.compile`` (what compiling the
   trainer's step would gain, and what the compilation costs);
3. the TTA evaluator (``evaluate_views``) against a plain per-batch loop, for ``source`` and ``ptbn``;
4. CBN's step time against BN's at one micro-batch size (goal: at most 1.5x), both paths.

    python benchmarks/train_throughput.py --out throughput_cpu.md
    python benchmarks/train_throughput.py --device cuda --steps 50 --compile reduce-overhead --out throughput_cuda.md
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from repro.adapt import create_method
from repro.adapt.evaluate import Evaluation, evaluate_views
from repro.data.base import ImageDataset, TensorSplit
from repro.data.loaders import PixelNormalizer
from repro.models import build_model
from repro.process import malloc_setting
from repro.store.provenance import device_name
from repro.train import TrainConfig, seed_everything
from repro.train.loop import _forward_backward, autocast, synchronize, train_and_evaluate

MEAN, STD = (0.286,), (0.353,)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=32, help="optimizer batch (default: 32, fmnist-microbatch's)")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round (default: 6)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the fastest is kept (default: 2)")
    parser.add_argument("--tta-images", type=int, default=256, help="images in the TTA view (default: 256)")
    parser.add_argument("--tta-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default: 1)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it starts instead of as repro's commands set it (repro.process)")
    parser.add_argument("--compile", metavar="MODE", help="also time the bare loop through torch.compile in this "
                        "mode (default, reduce-overhead: with CUDA graphs, ...); the epoch that compiles is apart")
    parser.add_argument("--out", type=Path, help="also write the markdown tables here")
    return parser.parse_args()


def best_of(rounds: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Each run returns seconds per unit; they alternate ``rounds`` times and each keeps its fastest."""
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = min(best[name], run())
    return best


def random_images(n: int, args: argparse.Namespace, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, args.image_size, args.image_size), generator=generator, dtype=torch.uint8)
    return images.to(device), torch.randint(0, 10, (n,), generator=generator).to(device)


def model_for(normalizer: str, args: argparse.Namespace, **options) -> nn.Module:
    seed_everything(0)
    return build_model(args.backbone, normalizer, num_classes=10, in_chans=1, small_input=True, **options)


def step_timer(model: nn.Module, cfg: TrainConfig, args: argparse.Namespace, device: torch.device,
               one_pass: bool) -> Callable[[], float]:
    """Seconds per optimizer step of the trainer's step (forward/backward, SGD, the normalizer's after_step)."""
    model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    images, labels = random_images(cfg.batch_size, args, device)
    x = PixelNormalizer(MEAN, STD, device, device.type == "cuda")(images)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    normalizer = model.normalizer
    normalizer.before_training(model, 1000)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _forward_backward(model, x, labels, cfg, device, torch.Generator(device=device), one_pass=one_pass)
        optimizer.step()
        normalizer.after_step(model)

    for _ in range(5):  # warm-up; fills CBN's windows (window 4)
        step()

    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        return (time.perf_counter() - start) / args.steps

    return run


def micro_batch_table(args: argparse.Namespace, device: torch.device) -> list[str]:
    lines = ["| normalizer | micro-batch | sequential ms/step | one pass ms/step | speed-up |", "|---|---|---|---|---|"]
    for normalizer, options in (("bn", {}), ("gn", {"groups": 32}), ("mimicnorm", {}), ("cbn", {"window": 4})):
        for micro_batch in args.micro_batches:
            cfg = TrainConfig(epochs=1, batch_size=args.batch, lr=0.01, micro_batch=micro_batch)
            times = best_of(args.rounds, {
                "sequential": step_timer(model_for(normalizer, args, **options), cfg, args, device, one_pass=False),
                "one_pass": step_timer(model_for(normalizer, args, **options), cfg, args, device, one_pass=True),
            })
            lines.append(f"| {normalizer} | {micro_batch} | {1000 * times['sequential']:.1f} | "
                         f"{1000 * times['one_pass']:.1f} | {times['sequential'] / times['one_pass']:.2f}x |")
    return lines


def cbn_table(args: argparse.Namespace, device: torch.device, micro_batch: int = 8) -> list[str]:
    cfg = TrainConfig(epochs=1, batch_size=args.batch, lr=0.01, micro_batch=micro_batch)
    times = best_of(args.rounds, {
        "bn one pass": step_timer(model_for("bn", args), cfg, args, device, one_pass=True),
        "bn sequential": step_timer(model_for("bn", args), cfg, args, device, one_pass=False),
        "cbn one pass": step_timer(model_for("cbn", args, window=4), cfg, args, device, one_pass=True),
        "cbn sequential": step_timer(model_for("cbn", args, window=4), cfg, args, device, one_pass=False),
    })
    lines = [f"| step at micro-batch {micro_batch}, batch {args.batch} | ms/step | vs BN one pass | vs BN sequential |",
             "|---|---|---|---|"]
    for name, seconds in times.items():
        lines.append(f"| {name} | {1000 * seconds:.1f} | {seconds / times['bn one pass']:.2f}x | "
                     f"{seconds / times['bn sequential']:.2f}x |")
    return lines


def trainer_table(args: argparse.Namespace, device: torch.device) -> list[str]:
    """img/s of train_and_evaluate against a bare loop: same model, batch, precision, data on the device."""
    steps = args.steps * 4
    n = args.batch * steps
    images, labels = random_images(n, args, device)
    split = TensorSplit(images.cpu(), labels.cpu())
    data = ImageDataset("benchmark", split, split.subset(args.batch), 10, MEAN, STD, "random")
    cfg = TrainConfig(epochs=1, batch_size=args.batch, eval_batch_size=args.batch, lr=0.01, warmup_epochs=0)
    on_cuda = device.type == "cuda"
    normalize = PixelNormalizer(MEAN, STD, device, on_cuda)

    def trainer() -> float:
        result = train_and_evaluate(model_for("bn", args), data, cfg, device=device, seed=0, progress=False)
        return 1 / result.images_per_s

    def bare_loop(compile_mode: str | None = None) -> Callable[[], float]:
        """Seconds per image of one epoch of the bare loop, on one model kept across rounds (compiled once)."""
        model = model_for("bn", args).to(device).train()
        if on_cuda:
            model.to(memory_format=torch.channels_last)
        forward = model if compile_mode is None else torch.compile(model, mode=compile_mode, dynamic=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                    fused=on_cuda or None)

        def epoch() -> float:
            order = torch.randperm(n, device=device)
            synchronize(device)
            start = time.perf_counter()
            for index in order.split(args.batch):
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, True):
                    logits = forward(normalize(images[index]))
                F.cross_entropy(logits.float(), labels[index]).backward()
                optimizer.step()
            synchronize(device)
            return (time.perf_counter() - start) / n

        return epoch

    loops = {"trainer": trainer, "bare": bare_loop()}
    first_compiled_s = None
    if args.compile:
        compiled = bare_loop(args.compile)
        first_compiled_s = compiled() * n  # this epoch compiles: reported apart, and not among the rounds
        loops["compiled"] = compiled
    times = best_of(args.rounds, loops)
    lines = ["| loop | img/s | vs bare |", "|---|---|---|",
             f"| bare PyTorch | {1 / times['bare']:.0f} | |",
             f"| repro trainer | {1 / times['trainer']:.0f} | {times['bare'] / times['trainer']:.2f} |"]
    if args.compile:
        compile_s = first_compiled_s - times["compiled"] * n
        lines.append(f"| bare PyTorch, torch.compile mode {args.compile} (compiling took {compile_s:.1f} s more) | "
                     f"{1 / times['compiled']:.0f} | {times['bare'] / times['compiled']:.2f} |")
    return lines


def plain_predictions(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
    normalize = PixelNormalizer(MEAN, STD, device, channels_last=False)
    with torch.no_grad():
        predictions = [model(normalize(batch)).argmax(1) for batch in images.split(batch_size)]
    torch.cat(predictions).cpu()


def batch_statistics_model(model: nn.Module) -> nn.Module:
    """A copy whose BatchNorms normalize with each test batch's statistics (prediction-time BN), by hand."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats, module.running_mean, module.running_var = False, None, None
    return model


def tta_table(args: argparse.Namespace, device: torch.device) -> list[str]:
    model = model_for("bn", args).to(device).eval()
    images, labels = random_images(args.tta_images, args, device, seed=1)
    lines = ["| method | test batch | evaluator img/s | plain loop img/s | evaluator / plain |",
             "|---|---|---|---|---|"]
    for method_name, plain_model in (("source", model), ("ptbn", batch_statistics_model(model))):
        method = create_method(method_name, copy.deepcopy(model))
        for batch_size in args.tta_batches:
            def evaluator(batch_size=batch_size, method=method) -> float:
                start = time.perf_counter()
                evaluate_views([Evaluation(method, batch_size, method.name)], lambda c, s: (images, labels),
                               [("benchmark", 1)], mean=MEAN, std=STD, device=device, seed=None)
                return (time.perf_counter() - start) / len(labels)

            def plain(batch_size=batch_size, plain_model=plain_model) -> float:
                start = time.perf_counter()
                plain_predictions(plain_model, images, batch_size, device)
                return (time.perf_counter() - start) / len(labels)

            times = best_of(args.rounds, {"evaluator": evaluator, "plain": plain})
            lines.append(f"| {method_name} | {batch_size} | {1 / times['evaluator']:.0f} | {1 / times['plain']:.0f} | "
                         f"{times['plain'] / times['evaluator']:.2f} |")
    return lines


def main() -> None:
    args = parse_args()
    malloc = malloc_setting(keep=not args.default_malloc)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    header = (f"{args.backbone} (small-input stem) at {args.image_size} px, optimizer batch {args.batch}, on "
              f"{device_name(device)}" + (f", {args.threads} thread(s)" if device.type == "cpu" else "")
              + f", {malloc}")
    sections = [("Micro-batch steps: sequential passes vs one pass", micro_batch_table),
                ("Trainer vs bare loop", trainer_table), ("TTA evaluator vs plain loop", tta_table),
                ("CBN vs BN", cbn_table)]
    text = [header, ""]
    print(header, flush=True)
    for title, table in sections:
        section = [f"### {title}", "", *table(args, device), ""]
        print("\n".join(section), flush=True)
        text += section
    if args.out:
        args.out.write_text("\n".join(text))


if __name__ == "__main__":
    main()

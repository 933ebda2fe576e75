"""Does a ``torch.compile``d training step compute what the eager step computes? Gradients against float64.

One Fashion-MNIST batch (the trainer's first shuffled batch, seed 0) through a freshly built BN model: the eager
float32 step, the compiled float32 step and the eager float64 step, with the micro-batches in one pass
(``repro.norms.ghost``) when ``--micro-batch`` is given. For each float32 variant it prints the parameters whose
gradients are furthest from float64's, each relative to that parameter's largest float64 entry. Before the
trainer compiles its step on a device, this is the check to run there (the README's "torch.compile, tried").

    python benchmarks/compile_precision.py --micro-batch 8              # CPU: the one-pass step, compiled
    python benchmarks/compile_precision.py                              # CPU: whole-batch statistics
    python benchmarks/compile_precision.py --device cuda --micro-batch 8 --mode reduce-overhead --data-dir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from repro.data import load_dataset, make_loader
from repro.models import build_model
from repro.norms.ghost import ghost_batches
from repro.process import keep_freed_memory
from repro.store.provenance import device_name
from repro.train import seed_everything


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=None, help="micro-batch size (default: whole batch)")
    parser.add_argument("--mode", default="default", help="torch.compile mode (default: default)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last model and images")
    parser.add_argument("--imagenet-stem", action="store_true",
                        help="timm's strided stem instead of the small-input one (28 px ends at 1x1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default: 1)")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding Fashion-MNIST's IDX files")
    parser.add_argument("--worst", type=int, default=3, help="parameters shown per variant (default: 3)")
    return parser.parse_args()


def gradients(model: torch.nn.Module, forward, images: torch.Tensor, labels: torch.Tensor,
              micro_batch: int | None) -> dict[str, torch.Tensor]:
    one_pass = ghost_batches(model, micro_batch) if micro_batch else contextlib.nullcontext()
    with one_pass:
        F.cross_entropy(forward(images), labels).backward()
    return {name: parameter.grad.double() for name, parameter in model.named_parameters()}


def main() -> None:
    args = parse_args()
    keep_freed_memory()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    data = load_dataset("fashion_mnist", data_dir=args.data_dir).subset(8 * args.batch, 1)
    loader = make_loader(data.train, args.batch, train=True, seed=0, device=device, mean=data.mean, std=data.std,
                         channels_last=args.channels_last)
    images, labels = next(iter(loader))
    seed_everything(0)
    model = build_model(args.backbone, "bn", num_classes=10, in_chans=1,
                        small_input=not args.imagenet_stem).to(device).train()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    compiled = copy.deepcopy(model)
    reference = copy.deepcopy(model).double()
    exact = gradients(reference, reference, images.double(), labels, args.micro_batch)
    variants = {
        "eager float32": gradients(model, model, images, labels, args.micro_batch),
        f"compiled float32 ({args.mode})": gradients(
            compiled, torch.compile(compiled, mode=args.mode, dynamic=False), images, labels, args.micro_batch),
    }
    print(f"{args.backbone} ({'ImageNet' if args.imagenet_stem else 'small-input'} stem), batch {args.batch}, "
          f"micro-batch {args.micro_batch or 'none'}, "
          f"{'channels-last' if args.channels_last else 'contiguous'}, on {device_name(device)}"
          + (f", {args.threads} thread(s)" if device.type == "cpu" else ""))
    print("| variant | largest error, relative to the parameter's largest float64 gradient | parameters |")
    print("|---|---|---|")
    for label, found in variants.items():
        errors = sorted(((found[name] - want).abs().max().item() / max(want.abs().max().item(), 1e-30), name)
                        for name, want in exact.items())
        worst = ", ".join(f"{name} {error:.1e}" for error, name in reversed(errors[-args.worst:]))
        print(f"| {label} | {errors[-1][0]:.1e} | {worst} |")


if __name__ == "__main__":
    main()

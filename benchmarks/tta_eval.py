"""Time the test-time adaptation evaluator: grouped (one pass per view for ``source``, several test batches per
forward for ptbn and bn_adapt) against the per-batch loop it replaces, in one process on the same view.

Prints a markdown table of milliseconds per image per method and batch size, both ways, and their ratio; the
rows of both ways must agree (errors exactly), which this script checks too.

    python benchmarks/tta_eval.py                          # CPU, fmnist-c-tta's methods and batch sizes
    python benchmarks/tta_eval.py --device cuda --images 2000
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from repro.adapt import create_method
from repro.adapt.evaluate import Evaluation, evaluate_views
from repro.models import build_model

# fmnist-c-tta's full-tier methods (labels, names, options)
METHODS = [("source", "source", {}), ("ptbn", "ptbn", {}), ("ptbn_logits", "ptbn", {"adapt_1d": True}),
           ("bn_adapt_N4", "bn_adapt", {"pseudo_samples": 4}), ("bn_adapt_N16", "bn_adapt", {"pseudo_samples": 16}),
           ("bn_adapt_N64", "bn_adapt", {"pseudo_samples": 64}),
           ("tent", "tent", {"optimizer": "adam", "lr": 0.001})]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--images", type=int, default=256, help="images in the view (default 256)")
    parser.add_argument("--batch-sizes", default="1,4,16,32,64,256")
    parser.add_argument("--skip-tent", action="store_true", help="leave out tent (its loop is the same both ways)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    model = build_model(args.backbone, "bn", num_classes=10, in_chans=1, small_input=True).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (args.images,), generator=generator)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    methods = [m for m in METHODS if not (args.skip_tent and m[1] == "tent")]
    seconds: dict[bool, float] = {}
    rows: dict[bool, list[dict]] = {}
    for grouped in (False, True):
        evaluations = [Evaluation(create_method(name, model, **options), size, label)
                       for label, name, options in methods for size in sizes]
        start = time.perf_counter()
        rows[grouped] = evaluate_views(evaluations, lambda *_: (images, labels), [("gaussian_noise", 3)],
                                       mean=(0.286,), std=(0.353,), device=device, grouped=grouped)
        seconds[grouped] = time.perf_counter() - start
    for a, b in zip(rows[False], rows[True], strict=True):
        assert a["error"] == b["error"], (a["method"], a["batch_size"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.backbone}, {args.images} images of 28 px, {device}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, load average {load:.1f}\n")
    print("| method | batch | per-batch loop ms/img | grouped ms/img | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for a, b in zip(rows[False], rows[True], strict=True):
        ratio = a["ms_per_image"] / b["ms_per_image"] if b["ms_per_image"] else float("inf")
        before, after = a["ms_per_image"], b["ms_per_image"]
        print(f"| {a['method']} | {a['batch_size']} | {before:.3f} | {after:.3f} | {ratio:.1f}x |")
    print(f"\nwhole view, all methods and batch sizes: loop {seconds[False]:.1f} s, grouped {seconds[True]:.1f} s "
          f"({seconds[False] / seconds[True]:.1f}x); errors identical")


if __name__ == "__main__":
    main()

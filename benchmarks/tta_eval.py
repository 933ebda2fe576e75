"""Time the test-time adaptation evaluator: grouped (one pass per view for ``source``, several test batches per
forward for ptbn and bn_adapt, several views' tent episodes side by side) against the per-batch loop it
replaces, in one process on the same views.

Prints a markdown table of milliseconds per image per method and batch size, both ways, and their ratio; the
rows of both ways must agree (errors exactly; tent's to float rounding), which this script checks too.

    python benchmarks/tta_eval.py                          # CPU, fmnist-c-tta's methods and batch sizes
    python benchmarks/tta_eval.py --device cuda --images 2000 --views 75
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
    parser.add_argument("--images", type=int, default=256, help="images per view (default 256)")
    parser.add_argument("--views", type=int, default=8, help="views (episodes), each its own images (default 8)")
    parser.add_argument("--batch-sizes", default="1,4,16,32,64,256")
    parser.add_argument("--skip-tent", action="store_true", help="leave out tent (its loop is the same both ways)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    model = build_model(args.backbone, "bn", num_classes=10, in_chans=1, small_input=True).eval()
    generator = torch.Generator().manual_seed(0)
    views = [("gaussian_noise", number) for number in range(args.views)]
    images = {view: torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8, generator=generator)
              for view in views}
    labels = torch.randint(0, 10, (args.images,), generator=generator)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    methods = [m for m in METHODS if not (args.skip_tent and m[1] == "tent")]
    seconds: dict[bool, float] = {}
    rows: dict[bool, list[dict]] = {}
    for grouped in (False, True):
        evaluations = [Evaluation(create_method(name, model, **options), size, label)
                       for label, name, options in methods for size in sizes]
        start = time.perf_counter()
        rows[grouped] = evaluate_views(evaluations, lambda *view: (images[view], labels), views,
                                       mean=(0.286,), std=(0.353,), device=device, grouped=grouped)
        seconds[grouped] = time.perf_counter() - start
    for a, b in zip(rows[False], rows[True], strict=True):
        assert a["error"] == b["error"] or a["method"] == "tent", (a["method"], a["batch_size"])
    tent_changed = sum(a["error"] != b["error"] for a, b in zip(rows[False], rows[True], strict=True))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.backbone}, {args.views} views of {args.images} images of 28 px, {device}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, load average {load:.1f}\n")
    print("| method | batch | per-batch loop ms/img | grouped ms/img | speed-up |")
    print("|---|---:|---:|---:|---:|")
    per_setting = {}
    for a, b in zip(rows[False], rows[True], strict=True):
        per_setting.setdefault((a["method"], a["batch_size"]), [0.0, 0.0])
        per_setting[a["method"], a["batch_size"]][0] += a["ms_per_image"] / args.views
        per_setting[a["method"], a["batch_size"]][1] += b["ms_per_image"] / args.views
    for (method, batch_size), (before, after) in per_setting.items():
        print(f"| {method} | {batch_size} | {before:.3f} | {after:.3f} | {before / after:.1f}x |")
    print(f"\nwhole run, all views, methods and batch sizes: loop {seconds[False]:.1f} s, grouped "
          f"{seconds[True]:.1f} s ({seconds[False] / seconds[True]:.1f}x); errors identical except {tent_changed} "
          "tent rows (float rounding)")


if __name__ == "__main__":
    main()

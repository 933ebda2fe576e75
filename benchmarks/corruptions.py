"""Time repro.corruptions against the reference implementation (imagecorruptions), per corruption.

Prints a markdown table of milliseconds per image (median over repeats) and optionally writes it to ``--out``.
Ours runs batched on ``--device``; the reference is a per-image numpy loop, always on the CPU, timed on fewer
images because its glass blur takes about a second per image.

    python benchmarks/corruptions.py --out corruptions_cpu.md            # CPU, 1 thread
    python benchmarks/corruptions.py --device cuda --out corruptions_cuda.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from repro.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="device for ours: cpu or cuda (default: cpu)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument("--batch", type=int, default=16, help="images per call of ours (default: 16)")
    parser.add_argument("--reference-images", type=int, default=4, help="images timed in the reference (default: 4)")
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (default: 1)")
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS + EXTRA_CORRUPTIONS))
    parser.add_argument("--no-reference", action="store_true", help="time ours only")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    return parser.parse_args()


def benchmark_images(count: int, size: int) -> np.ndarray:
    """Real photos (scikit-image's astronaut, chelsea, coffee; centre crop, bicubic resize), cycled to ``count``;
    random pixels if scikit-image is missing. ``(count, size, size, 3)`` uint8."""
    try:
        from PIL import Image
        from skimage import data
    except ImportError:
        return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    photos = []
    for image in (data.astronaut(), data.chelsea(), data.coffee()):
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = image[top : top + side, left : left + side]
        photos.append(np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC)))
    return np.stack([photos[i % len(photos)] for i in range(count)])


def median_seconds(run: Callable[[], object], repeats: int, synchronize: Callable[[], None]) -> float:
    run()  # warm-up: caches (frost textures), lazy imports, CUDA kernels
    timings = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    images = benchmark_images(max(args.batch, args.reference_images), args.size)
    batch = torch.from_numpy(images[: args.batch]).permute(0, 3, 1, 2).contiguous().to(device)

    if not args.no_reference:
        import cv2

        cv2.setNumThreads(args.threads)  # OpenCV would otherwise use every core for the reference
    reference_images = images[: args.reference_images]

    def reference_run(name: str) -> None:
        from repro.corruptions.reference import reference_corrupt

        for seed, image in enumerate(reference_images):
            reference_corrupt(image, name, args.severity, seed)

    rows = []
    for name in args.corruptions:
        ours = median_seconds(lambda name=name: corrupt(batch, name, args.severity), args.repeats, synchronize)
        ours_ms = 1000 * ours / args.batch
        if args.no_reference:
            rows.append(f"| {name} | {ours_ms:.1f} | | |")
        else:
            reference = median_seconds(lambda name=name: reference_run(name), args.repeats, lambda: None)
            reference_ms = 1000 * reference / len(reference_images)
            rows.append(f"| {name} | {ours_ms:.1f} | {reference_ms:.1f} | {reference_ms / ours_ms:.1f}x |")
        print(rows[-1], file=sys.stderr, flush=True)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    header = [
        f"repro.corruptions vs imagecorruptions 1.1.2: {args.size}x{args.size}, severity {args.severity}, "
        f"ms per image (median of {args.repeats}); ours: batch {args.batch} on {args.device} ({device_name}), "
        f"reference: {args.reference_images} images one by one on the CPU; {args.threads} thread(s), "
        f"torch {torch.__version__}",
        "",
        "| corruption | ours (ms/img) | reference (ms/img) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    table = "\n".join(header + rows) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()

"""Time repro.corruptions against imagecorruptions 1.1.2 (the reference) and its maintained fork, per corruption.

Prints a markdown table of milliseconds per image (median over repeats), the speed-up of ours over each, and the
geometric mean of the speed-ups over the 15 benchmark corruptions; optionally writes it to ``--out``. Ours runs
batched on ``--device``; the references are per-image numpy loops, always on the CPU, timed on fewer images
because 1.1.2's glass blur takes about a second per image. All three run in this process with the same thread
count (torch and OpenCV), so the ratios hold on a loaded machine.

The fork (``imagecorruptions-imaug``, numba-accelerated glass blur) installs under the same package name as
1.1.2, so it is read from its own directory (numba's compile time falls in the untimed warm-up):

    pip install numba && pip install --no-deps --target FORK_DIR imagecorruptions-imaug==1.1.5
    python benchmarks/corruptions.py --fork FORK_DIR --out corruptions_cpu.md   # CPU, 1 thread
    python benchmarks/corruptions.py --device cuda --no-reference --out corruptions_cuda.md
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from repro.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt
from repro.process import malloc_setting

FORK_PACKAGE = "imagecorruptions_imaug"  # the name the fork's module is loaded under here
FORK_SEEDED = ("impulse_noise", "glass_blur")  # fork functions that ignore np.random.seed and take seed=


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="device for ours: cpu or cuda (default: cpu)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument("--batch", type=int, default=16, help="images per call of ours (default: 16)")
    parser.add_argument("--reference-images", type=int, default=4, help="images timed in the references (default: 4)")
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (default: 1)")
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS + EXTRA_CORRUPTIONS))
    parser.add_argument("--no-reference", action="store_true", help="time ours only")
    parser.add_argument("--fork", type=Path, help="directory holding the fork's `imagecorruptions` package")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc as it starts instead of "
                        "keeping freed memory as repro's commands do (repro.process): ours then pays page faults")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    return parser.parse_args()


def benchmark_images(count: int, size: int) -> np.ndarray:
    """Real photos (scikit-image's astronaut, chelsea, coffee; centre crop, bicubic resize), cycled to ``count``;
    random pixels if scikit-image is missing. ``(count, size, size, 3)`` uint8."""
    try:
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


@functools.cache
def fork_module(directory: Path) -> types.ModuleType:
    """The fork's ``corruptions`` module, imported from ``directory`` under another name than 1.1.2's."""
    package_dir = directory / "imagecorruptions"
    spec = importlib.util.spec_from_file_location(
        FORK_PACKAGE, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    if spec is None or spec.loader is None or not package_dir.is_dir():
        sys.exit(f"--fork {directory}: no imagecorruptions package there (see this script's docstring)")
    package = importlib.util.module_from_spec(spec)
    sys.modules[FORK_PACKAGE] = package
    spec.loader.exec_module(package)
    return sys.modules[f"{FORK_PACKAGE}.corruptions"]


def fork_corrupt(module: types.ModuleType, image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """One image through the fork, seeded like ``reference_corrupt`` (global numpy RNG, plus ``seed=`` where the
    fork needs it)."""
    np.random.seed(seed)
    seeded = {"seed": seed} if name in FORK_SEEDED else {}
    return np.uint8(getattr(module, name)(Image.fromarray(image), severity, **seeded))


def median_seconds(run: Callable[[], object], repeats: int, synchronize: Callable[[], None]) -> float:
    run()  # warm-up: caches (frost textures), lazy imports, CUDA kernels, numba compilation
    timings = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def geometric_mean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else math.nan


def main() -> None:
    args = parse_args()
    # as in every repro command (repro.process); the references run in this process under the same allocator
    malloc = malloc_setting(keep=not args.default_malloc)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    images = benchmark_images(max(args.batch, args.reference_images), args.size)
    batch = torch.from_numpy(images[: args.batch]).permute(0, 3, 1, 2).contiguous().to(device)
    reference_images = images[: args.reference_images]

    references: dict[str, Callable[[np.ndarray, str, int], object]] = {}
    if not args.no_reference:
        import cv2

        from repro.corruptions.reference import reference_corrupt

        cv2.setNumThreads(args.threads)  # OpenCV would otherwise use every core for the references
        references["1.1.2"] = lambda image, name, seed: reference_corrupt(image, name, args.severity, seed)
        if args.fork:
            fork = fork_module(args.fork.resolve())
            references["fork"] = lambda image, name, seed: fork_corrupt(fork, image, name, args.severity, seed)

    def reference_ms(reference: Callable[[np.ndarray, str, int], object], name: str) -> float:
        def run() -> None:
            for seed, image in enumerate(reference_images):
                reference(image, name, seed)

        return 1000 * median_seconds(run, args.repeats, lambda: None) / len(reference_images)

    rows, speedups = [], {label: {} for label in references}
    for name in args.corruptions:
        ours_seconds = median_seconds(lambda name=name: corrupt(batch, name, args.severity), args.repeats, synchronize)
        ours_ms = 1000 * ours_seconds / args.batch
        cells = [f"{ours_ms:.2f}"]
        for label, reference in references.items():
            their_ms = reference_ms(reference, name)
            speedups[label][name] = their_ms / ours_ms
            cells += [f"{their_ms:.2f}", f"{their_ms / ours_ms:.2f}x"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], file=sys.stderr, flush=True)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    columns = ["corruption", "ours (ms/img)"]
    for label in references:
        columns += [f"{label} (ms/img)", f"speed-up vs {label}"]
    summary = [
        f"geometric mean of the speed-ups over {label} ({len(benchmark)} of the 15 benchmark corruptions): "
        f"{geometric_mean(list(benchmark.values())):.2f}x; ours slower on {sum(v < 1 for v in benchmark.values())}"
        for label, per_name in speedups.items()
        for benchmark in [{name: v for name, v in per_name.items() if name in CORRUPTIONS}]
    ]
    header = [
        f"repro.corruptions vs imagecorruptions 1.1.2 and its fork imagecorruptions-imaug (if timed): "
        f"{args.size}x{args.size}, severity "
        f"{args.severity}, ms per image (median of {args.repeats}); ours: batch {args.batch} on {args.device} "
        f"({device_name}), references: {args.reference_images} images one by one on the CPU; {args.threads} "
        f"thread(s), torch {torch.__version__}, {malloc}",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
    ]
    table = "\n".join(header + rows + ["", *summary]) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()

"""Measure the trainer's step time for the Fashion-MNIST suites' configurations and fit the estimate's device model.

For each configuration (backbone, normalizer, batch, micro-batch as in the suites) the real trainer runs two short
epochs on random 28 px images; the second epoch's time per step is the measurement. ``repro.execute.estimate``
counts each configuration's FLOPs and operations, and the table gives each one's seconds per operation and
FLOP rate: the launch-bound configurations bound ``seconds_per_op`` and the compute-bound ones ``flops_per_s`` of
``DEVICES``. Not yet run on a GPU.

    python benchmarks/calibrate_estimate.py --device cuda --out calibration_cuda.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from repro.data.base import ImageDataset, TensorSplit
from repro.execute.estimate import model_cost
from repro.models import build_model
from repro.norms import NORMALIZERS
from repro.results.provenance import device_name
from repro.train import TrainConfig, seed_everything, train_and_evaluate

#: (backbone, normalizer, normalizer options, batch, micro-batch): the suites' full-tier shapes
CONFIGS = [
    ("resnet18", "bn", {}, 128, None),
    ("resnet18", "gn", {"group_size": 8}, 128, None),
    ("resnet50", "bn", {}, 128, None),
    ("mobilenetv2_050", "bn", {}, 128, None),
    ("resnet18", "bn", {}, 256, None),
    ("resnet18", "bn", {}, 32, 2),
    ("resnet18", "bn", {}, 32, 32),
    ("resnet18", "brn", {}, 32, 2),
    ("resnet18", "brn", {}, 32, 8),
    ("resnet18", "cbn", {"window": 4}, 32, 2),
    ("resnet18", "cbn", {"window": 4}, 32, 8),
    ("resnet18", "mimicnorm", {}, 32, 2),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per epoch (default: 40)")
    parser.add_argument("--configs", type=int, nargs="+", help="indices into CONFIGS (default: all)")
    parser.add_argument("--out", type=Path, help="also write the table and the fit here")
    return parser.parse_args()


def measured_step_seconds(backbone: str, normalizer: str, options: dict, batch: int, micro_batch: int | None,
                          steps: int, device: torch.device) -> float:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch * steps, 1, 28, 28), generator=generator, dtype=torch.uint8)
    split = TensorSplit(images, torch.randint(0, 10, (batch * steps,), generator=generator))
    data = ImageDataset("random", split, split.subset(batch), 10, (0.286,), (0.353,), "random")
    cfg = TrainConfig(epochs=2, batch_size=batch, eval_batch_size=batch, lr=0.01, micro_batch=micro_batch,
                      crop_padding=2, flip=True)
    seed_everything(0)
    model = build_model(backbone, normalizer, num_classes=10, in_chans=1, small_input=True, **options)
    result = train_and_evaluate(model, data, cfg, device=device, seed=0, progress=False)
    return result.curve[-1]["epoch_time_s"] / steps


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    fit_rows = []
    lines = [f"Trainer step time on {device_name(device)}", "",
             "| backbone | normalizer | batch | micro-batch | passes | ms/step | GFLOP/step | ops/step | "
             "ms/op | TFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for index in args.configs or range(len(CONFIGS)):
        backbone, normalizer, options, batch, micro_batch = CONFIGS[index]
        seconds = measured_step_seconds(backbone, normalizer, options, batch, micro_batch, args.steps, device)
        groups = batch // (micro_batch or batch)
        one_pass = NORMALIZERS.get(normalizer).micro_batches_in_one_pass
        flops, train_ops, _ = model_cost(backbone, json.dumps({"name": normalizer, "options": options},
                                                              sort_keys=True), 28, 1, 10, True,
                                         groups if one_pass else 1, device.type != "cpu")
        passes = 1 if one_pass else groups
        work, ops = 3 * flops * batch, passes * train_ops
        fit_rows.append((work, ops, seconds))
        lines.append(f"| {backbone} | {normalizer} | {batch} | {micro_batch or batch} | {passes} | "
                     f"{1000 * seconds:.2f} | {work / 1e9:.1f} | {ops} | {1000 * seconds / ops:.4f} | "
                     f"{work / seconds / 1e12:.2f} |")
        print(lines[-1], flush=True)
    # seconds ≈ max(work / rate, ops * per_op): the launch-bound configurations bound per_op from above, the
    # compute-bound ones the rate from below
    per_op = min(seconds / ops for _, ops, seconds in fit_rows)
    rate = max(work / seconds for work, _, seconds in fit_rows)
    lines += ["", f"device model: seconds_per_op <= {per_op:.2e}, flops_per_s >= {rate:.3g}"]
    print(lines[-1])
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

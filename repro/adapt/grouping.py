"""Several test batches or episodes in one forward pass, and how many passes that makes: which methods the
evaluator (``repro.adapt.evaluate``) groups at which batch size on which device, the chunks it cuts, and the pass
count a time estimate needs (``evaluation_passes``). Its limits are read at call time from this module, so a test
may change them here."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from repro.adapt.base import AdaptationMethod

#: Images per forward pass when batches are grouped (stateless methods).
GROUPED_IMAGES = 512
#: On a CPU, batch statistics are grouped only below this test batch size: there the per-batch loop is bound by
#: the per-call overhead (2x faster grouped at batch 1), above it the loop is faster (0.76-0.95x grouped at 16
#: and 64, ResNet-20; benchmarks/tta_eval.py). A GPU groups every batch size: at these image sizes a forward
#: costs its kernel launches, whatever its batch (not yet measured on a GPU; the same benchmark will say).
GROUPED_BELOW = {"cpu": 8}


def grouped_chunks(order: torch.Tensor, batch_size: int, group: int) -> list[torch.Tensor]:
    """``order`` cut into batches, then consecutive full batches joined ``group`` at a time."""
    full = len(order) // batch_size * batch_size
    chunks = list(order[:full].split(batch_size * group)) if full else []  # splitting nothing gives one empty chunk
    return chunks + ([order[full:]] if full < len(order) else [])


def by_episode(values: torch.Tensor, step_sizes: Sequence[int], count: int) -> torch.Tensor:
    """Per-image results of a side-by-side stream (each step: ``count`` episodes × that step's size, in episode
    order) regrouped as E × N × ...: each episode's results in its stream order."""
    steps = values.split([count * size for size in step_sizes])
    return torch.cat([step.unflatten(0, (count, -1)) for step in steps], 1)


def groups_batches(batch_size: int, device_type: str) -> bool:
    """Whether several test batches of this size go through one forward on this device type."""
    return batch_size < GROUPED_BELOW.get(device_type, GROUPED_IMAGES + 1)


def predicts_batches_together(method: AdaptationMethod | type[AdaptationMethod], batch_size: int,
                              device_type: str) -> bool:
    """Whether the evaluator predicts several of a method's test batches per forward: ``source`` always (its
    predictions ignore the batch), methods that only read each batch's statistics where this device groups."""
    return method.batch_independent or (not method.stateful and groups_batches(batch_size, device_type))


def runs_episodes_side_by_side(method: AdaptationMethod | type[AdaptationMethod], episodic: bool, setting: str,
                               batch_size: int, device_type: str) -> bool:
    """Whether the evaluator runs a method's per-view episodes side by side (``AdaptationMethod.episodes``): a
    method that can and is not reset before every batch, under a setting that resets per view, at a batch size
    this device groups (on a CPU, tent at batch 1 runs 2.2x faster side by side, at 16 and 64 0.7-0.8x) and that
    leaves room for two or more episodes per forward."""
    return (method.parallel_episodes and not episodic and setting in ("episodic", "label_shift")
            and groups_batches(batch_size, device_type) and episodes_per_forward(batch_size) > 1)


def evaluation_passes(method: type[AdaptationMethod], options: dict[str, object], batch_size: int, images: int,
                      views: int, setting: str, clean_after: int, device_type: str) -> int:
    """Forward passes the evaluator makes for one method at one batch size over ``views`` views of ``images``
    images, with ``clean_after`` clean images scored after each view (stateful methods): what a time estimate
    needs, since small models at small test batches are bound by the cost per pass, not per image."""
    steps = -(-images // batch_size)
    clean_steps = -(-clean_after // batch_size) if method.stateful else 0
    if predicts_batches_together(method, batch_size, device_type):
        full_batches, partial = divmod(images, batch_size)  # as grouped_chunks cuts them
        return views * (-(-full_batches // episodes_per_forward(batch_size)) + (partial > 0))
    together = runs_episodes_side_by_side(method, bool(options.get("episodic")), setting, batch_size, device_type)
    forwards = -(-views // episodes_per_forward(batch_size)) if together else views
    return forwards * (steps + clean_steps)


def episodes_per_forward(batch_size: int) -> int:
    """Episodes side by side in one forward at this test batch size: up to ``GROUPED_IMAGES`` images."""
    return max(1, GROUPED_IMAGES // batch_size)

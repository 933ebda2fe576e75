"""The order in which test images arrive: a seeded permutation, and the label-shift orders (classes in turn, or
Dirichlet-drawn label proportions) of the ``label_shift`` setting (``repro.adapt.evaluate``)."""

from __future__ import annotations

import numpy as np
import torch


def evaluation_order(n: int, seed: int | None) -> torch.Tensor:
    """The order in which the n images of a view are evaluated: a fixed permutation, or file order for None."""
    if seed is None:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def label_shift_order(order: torch.Tensor, labels: torch.Tensor, seed: int | None) -> torch.Tensor:
    """``order`` regrouped class by class: classes in a permutation drawn from ``seed``, each class's images in
    the order they had (a stable sort on the class's rank)."""
    classes = int(labels.max()) + 1
    rank = torch.empty(classes, dtype=torch.long)
    rank[evaluation_order(classes, seed)] = torch.arange(classes)
    return order[torch.sort(rank[labels[order].cpu()], stable=True).indices]


def dirichlet_label_order(order: torch.Tensor, labels: torch.Tensor, gamma: float, seed: int | None
                          ) -> torch.Tensor:
    """``order`` regrouped into RoTTA's Dirichlet time slots (module docstring); the draws come from ``seed``
    (0 when the order is the file order, so that the stream is still reproducible)."""
    rng = np.random.default_rng(0 if seed is None else seed)
    ordered = labels[order].cpu().numpy()
    classes = int(ordered.max()) + 1
    slots: list[list[np.ndarray]] = [[] for _ in range(min(classes, 100))]
    proportions = rng.dirichlet([gamma] * len(slots), classes)
    for label, share in zip(range(classes), proportions, strict=True):
        members = np.flatnonzero(ordered == label)
        cuts = (np.cumsum(share)[:-1] * len(members)).astype(int)
        for slot, chunk in zip(slots, np.split(members, cuts), strict=True):
            slot.append(chunk)
    positions = [slot[i] for slot in slots for i in rng.permutation(len(slot))]
    return order[torch.from_numpy(np.concatenate(positions)).long()]

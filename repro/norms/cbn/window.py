"""``_Windows``: the past iterations one CBN layer pools with, a ring of fixed tensors per micro-batch position,
and the layout of the state a resumed run continues from (``entries``, ``CrossIterationBatchNorm2d.training_state``)."""

from __future__ import annotations

from typing import Any

import torch


class _Windows:
    """The last ``capacity`` iterations of every micro-batch position of one layer, in tensors allocated once and
    overwritten in turn (a ring per position). Compensating or storing any number of positions is then a fixed
    handful of batched operations, not a few per position and stored iteration; storing copies only what is new.

    Layouts are ``(P, capacity, …)``, so that what one iteration stores is one contiguous block per position, which
    the step writes in place: statistics ``(P, capacity, 4, C)`` (μ, ν, and their Taylor terms' products with the
    weight they were stored under, ⟨mean patch, W_τ⟩ and ⟨∂ν/∂W, W_τ⟩), mean patches ``(P, capacity, conv groups,
    K)``, ∂ν/∂W ``(P, capacity, C, K)``, with K = C_in/conv groups·kh·kw. Positions that go through one forward
    together (one pass over the micro-batches) are filled in step, so they share their fill level and next slot.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.stored: list[int] = []  # iterations stored so far, per position
        self.statistics: torch.Tensor | None = None
        self.mean_patches: torch.Tensor | None = None
        self.mean_square_grad: torch.Tensor | None = None

    @property
    def positions(self) -> int:
        return len(self.stored)

    def add_position(self) -> None:
        self.stored.append(0)

    def ring_state(self, position: int) -> tuple[int, int]:
        """The position's filled slots and the slot its next iteration overwrites."""
        stored = self.stored[position]
        return min(stored, self.capacity), stored % self.capacity

    def _shared_ring_state(self, first: int, count: int) -> tuple[int, int]:
        states = {self.ring_state(position) for position in range(first, first + count)}
        if len(states) > 1:  # the micro-batch count changed between steps
            raise RuntimeError("CBN windows of different lengths within one iteration; use the sequential path")
        return states.pop()

    def _allocate(self, like: torch.Tensor, channels: int, taylor_shape: tuple[int, int] | None) -> None:
        """Room for every position so far (positions appear in the first iterations only)."""
        grow = self.positions - (0 if self.statistics is None else self.statistics.shape[0])
        if grow <= 0:
            return

        def extended(old: torch.Tensor | None, shape: tuple[int, ...], dim: int) -> torch.Tensor:
            new = like.new_zeros(shape)
            return new if old is None else torch.cat((old, new), dim)

        self.statistics = extended(self.statistics, (grow, self.capacity, 4, channels), 0)
        if taylor_shape is not None:
            conv_groups, patch_size = taylor_shape
            self.mean_patches = extended(self.mean_patches, (grow, self.capacity, conv_groups, patch_size), 0)
            self.mean_square_grad = extended(self.mean_square_grad, (grow, self.capacity, channels, patch_size), 0)

    def _oldest_first(self, per_slot: torch.Tensor, filled: int, next_slot: int) -> torch.Tensor:
        """``(positions, capacity, …)`` → the filled slots, oldest iteration first."""
        if filled < self.capacity:
            return per_slot[:, :filled]
        return per_slot.roll(-next_slot, 1) if next_slot else per_slot

    def _weight_products(self, weight: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """⟨W_c, mean patch⟩ and ⟨W_c, ∂ν_c/∂W_c⟩ of every slot of ``count`` positions, ``(count, slots, C)``."""
        patches = self.mean_patches[first:first + count].flatten(0, 1)  # (count·slots, conv groups, K)
        grads = self.mean_square_grad[first:first + count].flatten(0, 1)  # (count·slots, C, K)
        conv_groups, channels = patches.shape[1], grads.shape[1]
        per_group = weight.reshape(conv_groups, channels // conv_groups, -1)
        mean_shift = torch.bmm(per_group, patches.permute(1, 2, 0))
        # each channel's weight as a row times its gradients as columns: on the CPU 7x faster than the
        # gradients times the weight as a column, a batched matrix-vector product
        mean_square_shift = torch.bmm(weight.reshape(channels, 1, -1), grads.permute(1, 2, 0))
        shape = (channels, count, -1)
        return mean_shift.reshape(shape).permute(1, 2, 0), mean_square_shift.reshape(shape).permute(1, 2, 0)

    def compensated(self, weight: torch.Tensor, rho: float, first: int, count: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """μ and ν of the stored iterations of positions ``first …`` moved to ``weight`` by ρ times their Taylor
        terms: two ``(count, stored iterations, C)`` tensors, oldest first."""
        filled, next_slot = self._shared_ring_state(first, count)
        if not filled:
            empty = weight.new_zeros(count, 0, weight.shape[0], dtype=torch.promote_types(weight.dtype, torch.float32))
            return empty, empty
        statistics = self.statistics[first:first + count]
        moments = statistics[:, :, :2]  # μ and ν, (count, slots, 2, C)
        if rho:  # both moments moved in one pass: stored + ρ·(⟨·, W⟩ − ⟨·, W_τ⟩)
            shifts = torch.stack(self._weight_products(weight.to(statistics.dtype), first, count), 2)
            moments = torch.add(moments, shifts - statistics[:, :, 2:], alpha=rho)
        moments = self._oldest_first(moments, filled, next_slot)
        return moments[:, :, 0], moments[:, :, 1]

    def next_slots(self, first: int, count: int, like: torch.Tensor, weight_shape: torch.Size,
                   conv_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The slots that the next iteration of positions ``first …`` goes into, as views to fill before
        ``advance``: statistics ``(count, 4, C)`` and, when compensating (``conv_groups`` given), the mean patches
        ``(count, conv groups, K)`` and ∂ν/∂W ``(count, *weight_shape)``. Writing results straight into them saves
        copying weight-sized tensors."""
        _, slot = self._shared_ring_state(first, count)
        patch_size = weight_shape[1:].numel()
        self._allocate(like, weight_shape[0], None if conv_groups is None else (conv_groups, patch_size))
        statistics = self.statistics[first:first + count, slot]
        if conv_groups is None:
            return statistics, None, None
        patches = self.mean_patches[first:first + count, slot]
        grads = self.mean_square_grad[first:first + count, slot].unflatten(2, weight_shape[1:])
        return statistics, patches, grads

    def advance(self, first: int, count: int) -> None:
        """Count the iteration written into ``next_slots`` as stored."""
        for position in range(first, first + count):
            self.stored[position] += 1

    def append(self, first: int, means: torch.Tensor, mean_squares: torch.Tensor, weight_shape: torch.Size,
               taylor: tuple[torch.Tensor, ...] | None = None) -> None:
        """Store one iteration of positions ``first …`` (``means``: ``(count, C)``). When compensating, ``taylor``
        holds the mean patches ``(count, conv groups, K)``, ∂ν/∂W ``(count, *weight_shape)`` and their products
        with the weight they were computed under, ``(count, C)`` each."""
        count = means.shape[0]
        conv_groups = None if taylor is None else taylor[0].shape[1]
        statistics, patches, grads = self.next_slots(first, count, means, weight_shape, conv_groups)
        if taylor is None:
            statistics[:, :2] = torch.stack((means, mean_squares), 1)
        else:
            mean_patches, mean_square_grads, *products = taylor
            statistics.copy_(torch.stack((means, mean_squares, *products), 1))
            patches.copy_(mean_patches)
            grads.copy_(mean_square_grads.reshape(grads.shape))  # a saved state holds them flattened
        self.advance(first, count)

    def entries(self, position: int) -> list[dict[str, Any]]:
        """The stored iterations of one position, oldest first, as plain tensors (a resumable run's state)."""
        filled, next_slot = self.ring_state(position)
        if not filled:
            return []
        one = slice(position, position + 1)
        statistics = self._oldest_first(self.statistics[one], filled, next_slot)[0]
        taylor = self.mean_patches is not None
        if taylor:
            patches = self._oldest_first(self.mean_patches[one], filled, next_slot)[0]
            grads = self._oldest_first(self.mean_square_grad[one], filled, next_slot)[0]
        return [{"mean": statistics[k, 0].clone(), "mean_square": statistics[k, 1].clone(),
                 "taylor": None if not taylor else {
                     "mean_patches": patches[k].clone(), "mean_square_grad": grads[k].clone(),
                     "mean_patches_dot_weight": statistics[k, 2].clone(),
                     "mean_square_grad_dot_weight": statistics[k, 3].clone()}}
                for k in range(filled)]

"""The adaptation-method contract and its registry.

A method wraps a trained model: it keeps its own deep copy (so that the caller's model, and any other
method built from it, is never changed), predicts logits for a stream of normalized test batches, and can
``reset`` to the state it had right after wrapping.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Self

import torch
from torch import nn

from repro.adapt.batchnorm import AdaptedBatchNorm
from repro.errors import UserError
from repro.registry import Registry


class AdaptationMethod:
    """Base class: the model in eval mode, predicting without changing any state.

    Subclasses set their options and then call ``super().__init__(model)``, which copies the model, lets
    ``_convert`` change the copy, and records the state that ``reset`` restores. ``adapted_layers`` names the
    layers a method changed; when it is empty the method behaves exactly as ``source`` (e.g. ``ptbn`` on a
    GroupNorm model), and ``adapts`` is False so results can say so.
    """

    name: ClassVar[str] = ""
    #: True when a prediction depends on the batches seen before (a learned update or running statistics), so
    #: the reset policy matters; False when each batch's prediction depends on that batch alone.
    stateful: ClassVar[bool] = False
    #: True when a prediction does not depend on the other images of its batch either (``source``): the
    #: evaluator then predicts a view once for every test batch size.
    batch_independent: ClassVar[bool] = False
    #: True when the method has ``episodes(count)``: several independent episodes (views, each from the reset
    #: state) side by side in one forward, for the evaluator's episodic settings.
    parallel_episodes: ClassVar[bool] = False
    #: True when the method never takes a gradient step (it only normalizes differently): one forward pass per
    #: image, which the time estimates count apart from the methods that also go backward.
    forward_only: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.adapted_layers = self._convert(self.model)
        self._initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.forward_images = 0  # images through a forward pass of the model, for the adaptation cost
        self.backward_images = 0  # images through a backward pass

    def _convert(self, model: nn.Module) -> list[str]:
        """Change the private copy in place; return the names of the layers changed."""
        return []

    @property
    def adapts(self) -> bool:
        """False when the method predicts as the source model does (nothing it could adapt was found)."""
        return bool(self.adapted_layers)

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for one normalized batch, already on the model's device."""
        return self._forward(batch)

    @torch.no_grad()
    def predict_frozen(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits from the current state without adapting further (e.g. clean accuracy after adaptation).

        Normalization still reads the batch as ``predict`` does (ptbn and tent use its statistics); only the
        updates (a gradient step, running statistics) are skipped.
        """
        return self._forward(batch)

    @contextmanager
    def grouped(self, batch_size: int) -> Iterator[None]:
        """Inside, ``predict`` takes several test batches of ``batch_size`` at once, each normalized with its own
        statistics, as if predicted one after the other (only for methods that are not ``stateful``)."""
        if self.stateful:
            raise TypeError(f"{self.name}: a stateful method cannot predict batches in groups")
        layers = [m for m in self.model.modules() if isinstance(m, AdaptedBatchNorm)]
        for layer in layers:
            layer.group_size = batch_size
        try:
            yield
        finally:
            for layer in layers:
                layer.group_size = None

    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Prepare on clean normalized batches before the test streams (EATA's Fisher); nothing by default."""

    def _forward(self, batch: torch.Tensor, backward: bool = False) -> torch.Tensor:
        """One forward pass of the private model, counted (with its backward pass when ``backward``)."""
        self.forward_images += len(batch)
        self.backward_images += len(batch) if backward else 0
        return self.model(batch)

    def reset(self) -> None:
        """Restore the parameters and buffers the model had right after wrapping."""
        self.model.load_state_dict(self._initial_state)

    def to(self, device: torch.device | str) -> Self:
        """Move the model to ``device``; this also resets the method."""
        self.model.to(device)
        self._initial_state = {k: v.to(device) for k, v in self._initial_state.items()}
        self.reset()
        return self


ADAPTATION_METHODS: Registry[type[AdaptationMethod]] = Registry("adaptation method")


def register_method(name: str) -> Callable[[type[AdaptationMethod]], type[AdaptationMethod]]:
    """Class decorator: register an AdaptationMethod subclass under ``name``."""
    return ADAPTATION_METHODS.register_named(name)


def create_method(name: str, model: nn.Module, **options: Any) -> AdaptationMethod:
    """Wrap ``model`` with the registered method ``name``; unknown or missing options are a user error."""
    cls = ADAPTATION_METHODS.get(name)
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
    try:
        inspect.signature(cls.__init__).bind(None, model, **options)
    except TypeError as err:
        raise UserError(
            f"adaptation method {name!r}: bad options {sorted(options)} ({err}); allowed: {allowed}"
        ) from None
    return cls(model, **options)

"""Counter-based random numbers for corruptions: no generator state, so results do not depend on batching.

Every random number is a hash of (seed, corruption, purpose, dataset index of the image, element position),
computed with int64 tensor ops that give the same bits on CPU and CUDA. An image therefore receives the same
noise whichever batch it arrives in, and no global RNG (torch, numpy, random) is read or advanced.
"""

from __future__ import annotations

import math
import zlib
from typing import TypeVar

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_STREAM_SALT = 0x2545F491
_Word = TypeVar("_Word", int, Tensor)


def _mul32(x: _Word, constant: int) -> _Word:
    """``(x * constant) mod 2**32`` for ``x < 2**32``, split in 16-bit halves so int64 never overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: _Word) -> _Word:
    """Wellons' ``lowbias32`` integer hash: a bijection on 32-bit words with strong avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix(state: _Word, word: _Word) -> _Word:
    """Fold one more 32-bit word into a hash state (order-sensitive)."""
    return _hash32(state ^ _hash32(word & _MASK32))


def _text_word(text: str) -> int:
    return zlib.crc32(text.encode())


class RandomStream:
    """Random numbers for one call of one corruption: ``(N, *shape)`` draws, row ``i`` keyed by ``indices[i]``.

    ``purpose`` names the draw (``"noise"``, ``"angle"``, ...) so that different draws are independent.
    """

    def __init__(self, seed: int, corruption: str, indices: Tensor) -> None:
        state = _mix(_mix(_STREAM_SALT, seed & _MASK32), (seed >> 32) & _MASK32)
        self._state = _mix(state, _text_word(corruption))
        self.indices = indices.to(torch.int64)

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def bits(self, purpose: str, shape: tuple[int, ...]) -> Tensor:
        """Uniform 32-bit words (int64 in ``[0, 2**32)``) of shape ``(N, *shape)``."""
        numel = math.prod(shape)
        if numel >= 2**32:
            raise ValueError(f"a random draw of {numel} elements per image is larger than the 32-bit counter")
        purpose_state = _mix(self._state, _text_word(purpose))
        key = _mix(_mix(purpose_state, self.indices), self.indices >> 32)[:, None]
        second_key = _hash32(key ^ 0x5BD1E995)
        counter = torch.arange(numel, dtype=torch.int64, device=self.device)[None, :]
        words = _hash32(_hash32(counter ^ key) ^ second_key)
        return words.reshape(len(self.indices), *shape)

    def uniform(
        self,
        purpose: str,
        shape: tuple[int, ...] = (),
        low: float = 0.0,
        high: float = 1.0,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Uniform in the open interval ``(low, high)``; float32 uses 23 random bits so 1.0 cannot round in."""
        words = self.bits(purpose, shape)
        if dtype == torch.float64:
            unit = (words.to(torch.float64) + 0.5) * 2.0**-32
        else:
            unit = ((words >> 9).to(dtype) + 0.5) * 2.0**-23
        return low + (high - low) * unit

    def normal(self, purpose: str, shape: tuple[int, ...] = (), mean: float = 0.0, std: float = 1.0) -> Tensor:
        """Gaussian draws by the Box–Muller transform of two independent uniforms."""
        radius_unit = self.uniform(purpose + "/radius", shape)
        angle_unit = self.uniform(purpose + "/angle", shape)
        standard = torch.sqrt(-2.0 * torch.log(radius_unit)) * torch.cos(2.0 * math.pi * angle_unit)
        return mean + std * standard

    def integers(self, purpose: str, low: int | Tensor, high: int | Tensor, shape: tuple[int, ...] = ()) -> Tensor:
        """Integers uniform in ``[low, high)`` (int64) by multiply-shift on 24 random bits, exact on any device.

        ``low``/``high`` may be per-image ``(N,)`` tensors; their range must be below ``2**24``.
        """
        per_image_shape = (-1,) + (1,) * len(shape)
        low_t = torch.as_tensor(low, dtype=torch.int64, device=self.device).reshape(per_image_shape)
        span = torch.as_tensor(high, dtype=torch.int64, device=self.device).reshape(per_image_shape) - low_t
        if (span <= 0).any() or (span >= 2**24).any():
            raise ValueError("integers() needs 0 < high - low < 2**24")
        return low_t + ((self.bits(purpose, shape) >> 8) * span >> 24)

    def poisson(self, purpose: str, rates: Tensor, rate_index: Tensor) -> Tensor:
        """Exact Poisson draws: element ``e`` has rate ``rates[rate_index[e]]`` (``rate_index`` is ``(N, ...)``).

        Inverse-CDF sampling: the smallest ``k`` with ``P(X <= k) >= u``, found by bisection in a table of the
        CDF for every rate in ``rates``. The table is built on the CPU in float64 (regularised incomplete gamma
        function) so CPU and CUDA draw identical counts; a small ``rates`` table (e.g. one rate per uint8 grey
        level) keeps it cheap.
        """
        rates_cpu = rates.detach().to("cpu", torch.float64)
        top = float(rates_cpu.max()) if rates_cpu.numel() else 0.0
        largest_count = math.ceil(top + 12.0 * math.sqrt(top) + 12.0)
        counts = torch.arange(largest_count + 1, dtype=torch.float64)
        cdf = torch.special.gammaincc(counts[None, :] + 1.0, rates_cpu[:, None])
        cdf[:, -1] = 1.0  # P(X > largest_count) < 1e-25, far below the resolution of u
        flat_cdf = cdf.reshape(-1).to(self.device)
        row_start = rate_index.to(torch.int64) * (largest_count + 1)

        u = self.uniform(purpose, tuple(rate_index.shape[1:]), dtype=torch.float64)
        low = torch.zeros_like(row_start)
        high = torch.full_like(row_start, largest_count)
        for _ in range(math.ceil(math.log2(largest_count + 1))):
            middle = (low + high) // 2
            reached = flat_cdf[row_start + middle] >= u
            high = torch.where(reached, middle, high)
            low = torch.where(reached, low, middle + 1)
        return low

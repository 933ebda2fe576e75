"""Counter-based random numbers for corruptions: no generator state, so results do not depend on batching.

Every random number is a hash of (seed, corruption, purpose, dataset index of the image, element position),
computed with int64 tensor ops that give the same bits on CPU and CUDA. An image therefore receives the same
noise whichever batch it arrives in, and no global RNG (torch, numpy, random) is read or advanced.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_STREAM_SALT = 0x2545F491
_HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)  # Wellons' lowbias32 constants
# int32 operands of the CPU path as 0-dim tensors: a Python int operand costs a conversion per operation.
_INT32_MULTIPLIERS = tuple(torch.tensor(m - 2**32 if m >= 2**31 else m, dtype=torch.int32) for m in _HASH_MULTIPLIERS)
_INT32_LOW_BITS = {shift: torch.tensor(_MASK32 >> shift, dtype=torch.int32) for shift in (15, 16)}
_CPU_BLOCK = 1 << 16  # words hashed at a time on the CPU: temporaries stay in cache (about 5x faster)


def _hash32_int(x: int) -> int:
    """Wellons' ``lowbias32`` integer hash (a bijection on 32-bit words with strong avalanche), for Python ints."""
    for shift, multiplier in zip((16, 15), _HASH_MULTIPLIERS, strict=True):
        x = ((x ^ (x >> shift)) * multiplier) & _MASK32
    return x ^ (x >> 16)


def _mul32_(x: Tensor, constant: int) -> Tensor:
    """In place ``x = (x * constant) mod 2**32`` for ``0 <= x < 2**32``, in 16-bit halves so int64 never overflows
    (signed overflow would be undefined behaviour, and CPU and CUDA must give the same bits)."""
    high_part = (x * (constant >> 16)).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(constant & 0xFFFF).add_(high_part).bitwise_and_(_MASK32)


def _hash32_(x: Tensor) -> Tensor:
    """``_hash32_int`` in place on an int64 tensor of 32-bit words."""
    for shift, multiplier in zip((16, 15), _HASH_MULTIPLIERS, strict=True):
        _mul32_(x.bitwise_xor_(x >> shift), multiplier)
    return x.bitwise_xor_(x >> 16)


def _hash32_int32_(x: Tensor) -> Tensor:
    """``_hash32_`` in place on an int32 tensor holding the words' bit patterns (the CPU path: half the memory
    and a third of the operations of the int64 path). Right shifts are arithmetic, so the sign-extended bits are
    masked off. Products wrap modulo ``2**32``: ATen's CPU kernels multiply int32 with the two's-complement
    ``vpmulld``/``imul`` instructions (a uint32 view would be exact by definition but is not vectorised, 20x
    slower). ``test_int32_hash_of_the_cpu_path_is_the_integer_hash`` checks this against the integer hash."""
    for shift, multiplier in zip((16, 15), _INT32_MULTIPLIERS, strict=True):
        x.bitwise_xor_((x >> shift).bitwise_and_(_INT32_LOW_BITS[shift])).mul_(multiplier)
    return x.bitwise_xor_((x >> 16).bitwise_and_(_INT32_LOW_BITS[16]))


def _as_word_dtype(words: Tensor, dtype: torch.dtype) -> Tensor:
    """int64 words in ``[0, 2**32)`` as ``dtype``: int64 unchanged, int32 with the same bit pattern."""
    if dtype == torch.int64:
        return words
    return torch.where(words >= 2**31, words - 2**32, words).to(dtype)


def _word_arithmetic(device: torch.device) -> tuple[torch.dtype, Callable[[Tensor], Tensor]]:
    """How words are held and hashed on ``device``: int32 bit patterns on the CPU, int64 words on CUDA."""
    return (torch.int64, _hash32_) if device.type == "cuda" else (torch.int32, _hash32_int32_)


def _word_pattern(word: int, dtype: torch.dtype) -> int:
    """A 32-bit word as the Python int with its bit pattern in ``dtype`` (int32: signed)."""
    return word - 2**32 if dtype == torch.int32 and word >= 2**31 else word


def _unit(words: Tensor, dtype: torch.dtype) -> Tensor:
    """Words (int64 in ``[0, 2**32)`` or their int32 bit patterns) as uniforms in the open interval (0, 1): all 32
    bits for float64, the top 23 for narrower types so that 1.0 cannot round in."""
    if dtype == torch.float64:
        return ((words.to(torch.int64) & _MASK32).to(torch.float64) + 0.5) * 2.0**-32
    return (((words >> 9) & 0x7FFFFF).to(dtype) + 0.5) * 2.0**-23


def _mix_int(state: int, word: int) -> int:
    """Fold one more 32-bit word into a hash state (order-sensitive)."""
    return _hash32_int(state ^ _hash32_int(word & _MASK32))


def _mix_words(state: int, words: Tensor) -> Tensor:
    """``_mix_int`` with one word per tensor element."""
    return _hash32_(_hash32_(words & _MASK32).bitwise_xor_(state))


def _text_word(text: str) -> int:
    return zlib.crc32(text.encode())


class RandomStream:
    """Random numbers for one call of one corruption: ``(N, *shape)`` draws, row ``i`` keyed by ``indices[i]``.

    ``purpose`` names the draw (``"noise"``, ``"angle"``, ...) so that different draws are independent.
    """

    def __init__(self, seed: int, corruption: str, indices: Tensor) -> None:
        state = _mix_int(_mix_int(_STREAM_SALT, seed & _MASK32), (seed >> 32) & _MASK32)
        self._state = _mix_int(state, _text_word(corruption))
        self.indices = indices.to(torch.int64)
        # The CPU hashes int32 bit patterns (see _hash32_int32_), CUDA int64 words. The parts of the per-image
        # keys that do not depend on the purpose are computed once here.
        self._word_dtype, self._hash = _word_arithmetic(self.device)
        self._index_word = _as_word_dtype(_hash32_(self.indices & _MASK32), self._word_dtype)[:, None]
        self._index_salt = _as_word_dtype(_mix_words(_STREAM_SALT, self.indices >> 32), self._word_dtype)[:, None]

    def _keys(self, purpose: str) -> tuple[Tensor, Tensor]:
        """The two ``(N, 1)`` per-image keys of ``purpose``: ``mix(purpose state, index)`` and its hash."""
        purpose_state = _word_pattern(_mix_int(self._state, _text_word(purpose)), self._word_dtype)
        key = self._hash(self._index_word ^ purpose_state).bitwise_xor_(self._index_salt)
        return key, self._hash(key ^ _word_pattern(0x5BD1E995, self._word_dtype))

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def bits(self, purpose: str, shape: tuple[int, ...]) -> Tensor:
        """Uniform 32-bit words (int64 in ``[0, 2**32)``) of shape ``(N, *shape)``.

        Word ``e`` of image ``i`` is ``hash(hash(e ^ key_i) ^ key2_i)``, keys derived from (seed, corruption,
        purpose, index). Computed in blocks on the CPU, in one go on CUDA; the blocking does not change the bits.
        """
        return self.map_words((purpose,), shape, torch.int64, lambda words: words.to(torch.int64) & _MASK32)

    def uniform(
        self,
        purpose: str,
        shape: tuple[int, ...] = (),
        low: float = 0.0,
        high: float = 1.0,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Uniform in the open interval ``(low, high)``; float32 uses 23 random bits so 1.0 cannot round in."""
        return self.map_words((purpose,), shape, dtype, lambda words: low + (high - low) * _unit(words, dtype))

    def normal(
        self,
        purpose: str,
        shape: tuple[int, ...] = (),
        mean: float = 0.0,
        std: float = 1.0,
        added_to: Tensor | None = None,
    ) -> Tensor:
        """Gaussian draws by the Box–Muller transform of two independent uniforms; ``added_to + draws`` if given
        (``(N, *shape)``), added block by block, which saves a full-size pass."""

        def box_muller(radius_words: Tensor, angle_words: Tensor, *base: Tensor) -> Tensor:
            radius_unit, angle_unit = _unit(radius_words, torch.float32), _unit(angle_words, torch.float32)
            standard = torch.sqrt(-2.0 * torch.log(radius_unit)) * torch.cos(2.0 * math.pi * angle_unit)
            draws = mean + std * standard
            return base[0] + draws if base else draws

        purposes = (purpose + "/radius", purpose + "/angle")
        bases = () if added_to is None else (added_to,)
        return self.map_words(purposes, shape, torch.float32, box_muller, *bases)

    def map_words(
        self,
        purposes: tuple[str, ...],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        transform: Callable[..., Tensor],
        *inputs: Tensor,
    ) -> Tensor:
        """``transform(words_1, ..., words_k, input_1, ...)`` of the words of ``purposes`` and the matching
        elements of ``inputs`` (each ``(N, *shape)``), block by block: ``transform`` must be elementwise and must
        read words as 32-bit patterns (int32 on the CPU, int64 in ``[0, 2**32)`` on CUDA: mask after right
        shifts, as ``(words >> 8) & 0xFFFFFF``).

        On the CPU the words are hashed in int32 (a quarter of the int64 work; same bits, see ``_hash32_int32_``)
        in blocks that stay in cache, and ``transform`` runs on each block before the next is hashed, so no
        full-size intermediate is ever written. On CUDA there is one block and the int64 hash.
        """
        count, numel = len(self.indices), math.prod(shape)
        if numel >= 2**32:
            raise ValueError(f"a random draw of {numel} elements per image is larger than the 32-bit counter")
        on_cpu = self.device.type != "cuda"
        word_dtype, hash_ = self._word_dtype, self._hash
        keys = [self._keys(purpose) for purpose in purposes]
        flat_inputs = [tensor.reshape(count, numel) for tensor in inputs]
        values = torch.empty(count, numel, dtype=dtype, device=self.device)
        block = max(1, _CPU_BLOCK // max(count, 1)) if on_cpu else max(numel, 1)
        for start in range(0, numel, block):
            stop = min(start + block, numel)
            counter = torch.arange(start, stop, dtype=word_dtype, device=self.device)[None, :]
            words = [hash_(hash_(counter ^ key).bitwise_xor_(second_key)) for key, second_key in keys]
            values[:, start:stop] = transform(*words, *(tensor[:, start:stop] for tensor in flat_inputs))
        return values.reshape(count, *shape)

    def integers(self, purpose: str, low: int | Tensor, high: int | Tensor, shape: tuple[int, ...] = ()) -> Tensor:
        """Integers uniform in ``[low, high)`` (int64) by multiply-shift on 24 random bits, exact on any device.

        ``low``/``high`` may be per-image ``(N,)`` tensors; their range must be below ``2**24`` (checked for
        tensors on the CPU only).
        """
        per_image_shape = (-1,) + (1,) * len(shape)
        low_t = torch.as_tensor(low, dtype=torch.int64, device=self.device).reshape(per_image_shape)
        span = torch.as_tensor(high, dtype=torch.int64, device=self.device).reshape(per_image_shape) - low_t
        # Checked where that is free: for Python ints, and for tensors on the CPU (on CUDA it would wait for the
        # device; callers pass valid ranges).
        if isinstance(low, int) and isinstance(high, int):
            out_of_range = not 0 < high - low < 2**24
        else:
            out_of_range = span.device.type == "cpu" and bool((span <= 0).any() or (span >= 2**24).any())
        if out_of_range:
            raise ValueError("integers() needs 0 < high - low < 2**24")
        return low_t + ((self.bits(purpose, shape) >> 8) * span >> 24)

    def poisson(self, purpose: str, rates: Tensor, rate_index: Tensor) -> Tensor:
        """Exact Poisson draws: element ``e`` has rate ``rates[rate_index[e]]`` (``rate_index`` is ``(N, ...)``).

        Inverse-CDF sampling: the smallest ``k`` with ``P(X <= k) >= u``, i.e. the number of CDF entries below
        ``u``, found by a branchless binary search in a table of the CDF for every rate in ``rates``. The table is
        built on the CPU in float64 (regularised incomplete gamma function) so CPU and CUDA draw identical
        counts; a small ``rates`` table (e.g. one rate per uint8 grey level) keeps it cheap. The search runs
        block by block with the random words (``map_words``).
        """
        rates_cpu = rates.detach().to("cpu", torch.float64)
        top = float(rates_cpu.max()) if rates_cpu.numel() else 0.0
        largest_count = math.ceil(top + 12.0 * math.sqrt(top) + 12.0)
        support = torch.arange(largest_count + 1, dtype=torch.float64)
        steps = math.ceil(math.log2(largest_count + 1))
        # Rows padded with 1.0 to 2**steps entries, so probes stay inside their row; 1.0 is never below u.
        cdf = torch.ones(len(rates_cpu), 2**steps, dtype=torch.float64)
        cdf[:, :largest_count] = torch.special.gammaincc(support[None, :-1] + 1.0, rates_cpu[:, None])
        # cdf[:, largest_count] stays 1.0: P(X > largest_count) < 1e-25, far below the resolution of u
        table = cdf.reshape(-1).to(self.device)

        def inverse_cdf(words: Tensor, row_index: Tensor) -> Tensor:
            u = _unit(words, torch.float64)
            row_start = row_index.to(torch.int64) * 2**steps
            below = torch.zeros_like(row_start)  # CDF entries known to be below u
            for step in (2**power for power in reversed(range(steps))):
                below += (table.take(row_start + below + (step - 1)) < u) * step
            return below

        shape = tuple(rate_index.shape[1:])
        return self.map_words((purpose,), shape, torch.int64, inverse_cdf, rate_index)

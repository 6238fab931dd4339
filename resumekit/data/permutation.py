"""A keyed pseudo-random permutation of ``range(n)`` that is computed position by position.

``torch.randperm(n)`` must build the whole permutation to give any one element of it: O(n) time and
``8 * n`` bytes, seconds and gigabytes for datasets of 1e8+ samples. :class:`RandomAccessPermutation`
gives element ``p`` of an epoch's order directly, for a whole array of positions at once (vectorised
with numpy), so landing anywhere in an epoch costs only what the positions asked for.

Construction (format-relevant: changing any constant changes every saved run's order):

* Small ranges. Up to :data:`SMALL` elements the order is the stable argsort of the elements' 64-bit
  splitmix64 hashes under the first round key (a uniform shuffle, up to the hash's quality), built once
  per epoch: a Feistel network over a domain of a few bits is measurably non-uniform (see Rounds), and
  building this table costs no more than computing one chunk of a large range.
* Domain. Above :data:`SMALL`, the smallest power of two ``2**k >= n``, split into a high and a low
  field of ``ceil(k/2)`` and ``floor(k/2)`` bits. Staying within a factor 2 of ``n`` keeps cycle walking
  short.
* Rounds. :data:`ROUNDS` unbalanced Feistel rounds. A round with low field ``L`` (``w_lo`` bits) and high
  field ``H`` (``w_hi`` bits) maps ``H * 2**w_lo + L`` to ``L * 2**w_hi + (H ^ F_i(L))``, where ``F_i(L)`` is
  the top ``w_hi`` bits of the splitmix64 output at stream offset ``L`` for the round key ``key_i``. Each
  round is a bijection of the domain whatever ``F_i`` is (``L`` is kept and ``H`` can be recovered), so
  the composition is one as well; the two field widths swap after every round. Why 8 rounds and a table
  below :data:`SMALL` (measured, chi-square of 32x32 position/value buckets and of the gaps between
  neighbours, over 1e8+ samples): with fields of 8-9 bits (n just above 65,536) and up, 8 rounds show
  no detectable bias; with 5-bit fields (n = 1,000) 8 rounds are clearly biased, and for n = 5, 8 rounds
  fail a plain element-by-position test.
* Keys. ``key_i`` comes from the splitmix64 stream of a 64-bit state derived from ``(seed, epoch)`` by
  two finalizer steps (bijections): the epochs of one seed, and the seeds at one epoch, all get different
  keys (unlike ``torch``'s ``seed + epoch``, under which seed 1 epoch 0 and seed 0 epoch 1 share an order).
* Cycle walking. A value ``>= n`` is mapped again until it falls below ``n``. Applied to a permutation of
  the domain, this yields a permutation of ``range(n)``: the walk follows the cycle of the starting
  element, which returns to ``range(n)`` at the latest when it comes back to where it started, and two
  different starts cannot reach the same value (the walk is invertible). Expected steps: below 2.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["ROUNDS", "SMALL", "RandomAccessPermutation", "round_keys", "strided_chunks"]

# Feistel rounds (see the module docstring for why this many).
ROUNDS = 8
# Largest range whose order is a table of sorted keyed hashes instead of a Feistel network.
SMALL = 1 << 16
# strided_chunks starts small, so the first batch after a resume waits for little, and doubles up to this.
_FIRST_CHUNK, _MAX_CHUNK = 1 << 10, 1 << 16
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
# Distinguishes this use of splitmix64 from any other seeded by the same numbers.
_DOMAIN = 0x7265736B_69745F70  # "reskit_p"


def _mix(z: int) -> int:
    """The splitmix64 finalizer on a Python int (a bijection of 64-bit values)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def round_keys(seed: int, epoch: int, rounds: int = ROUNDS) -> list[int]:
    """The Feistel round keys of one epoch's order.

    Args:
        seed: The sampler's seed (any int; taken modulo ``2**64``).
        epoch: The epoch number (any int; taken modulo ``2**64``).
        rounds: Number of keys.

    Returns:
        ``rounds`` 64-bit keys.
    """
    # For a fixed seed the state is a bijection of the epoch and vice versa, so no two epochs of one
    # seed (and no two seeds at one epoch) share their keys.
    state = _mix(_mix((seed & _MASK64) ^ _DOMAIN) ^ (epoch & _MASK64))
    return [_mix(state + (i + 1) * _GOLDEN) for i in range(rounds)]


_U = np.uint64


def _splitmix(offsets: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64 output at stream ``offsets`` for ``key`` (uint64 in and out; arithmetic wraps)."""
    z = offsets * _U(_GOLDEN)
    z += key
    z ^= z >> _U(30)
    z *= _U(_M1)
    z ^= z >> _U(27)
    z *= _U(_M2)
    z ^= z >> _U(31)
    return z


class RandomAccessPermutation:
    """Element ``p`` of a keyed pseudo-random permutation of ``range(length)``, for arrays of ``p``.

    Args:
        length: ``n``, the size of the permuted range.
        seed: The seed of the order.
        epoch: The epoch of the order; each epoch of a seed has its own keys, so its own shuffle.

    Raises:
        ValueError: ``length`` is negative or not below ``2**62``.
    """

    def __init__(self, length: int, seed: int, epoch: int) -> None:
        if not 0 <= length < 1 << 62:
            raise ValueError(f"RandomAccessPermutation: length must be in [0, 2**62), got {length}")
        self.length = int(length)
        self._keys = [_U(k) for k in round_keys(seed, epoch)]
        bits = max(2, (self.length - 1).bit_length())
        # Field widths of the first round; they swap after each round.
        self._hi, self._lo = (bits + 1) // 2, bits // 2
        self._table: np.ndarray | None = None
        if self.length <= SMALL:
            hashes = _splitmix(np.arange(self.length, dtype=np.uint64), self._keys[0])
            # Stable, so the (astronomically rare) equal hashes still give one platform-independent order.
            self._table = np.argsort(hashes, kind="stable").astype(np.int64)

    def __len__(self) -> int:
        """The size of the permuted range."""
        return self.length

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        """One pass of the Feistel network over the power-of-two domain (uint64 in, uint64 out)."""
        w_hi, w_lo = self._hi, self._lo
        for key in self._keys:
            low = x & _U((1 << w_lo) - 1)
            high = x >> _U(w_lo)
            high ^= _splitmix(low, key) >> _U(64 - w_hi)
            x = (low << _U(w_hi)) | high
            w_hi, w_lo = w_lo, w_hi
        return x

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The permutation's elements at ``positions``.

        Args:
            positions: Integer array of positions in ``[0, length)``.

        Returns:
            An int64 array of the same shape: the dataset indices at those positions.

        Raises:
            IndexError: A position lies outside ``[0, length)``.
        """
        pos = np.asarray(positions)
        if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= self.length):
            raise IndexError(
                f"RandomAccessPermutation: positions must lie in [0, {self.length}), got "
                f"[{int(pos.min())}, {int(pos.max())}]"
            )
        if self._table is not None:
            return self._table[pos.astype(np.int64)]
        out = self._encrypt(pos.astype(np.uint64).reshape(-1))
        n = _U(self.length)
        pending = np.flatnonzero(out >= n)
        while pending.size:
            out[pending] = self._encrypt(out[pending])
            pending = pending[out[pending] >= n]
        return out.astype(np.int64).reshape(pos.shape)

    def full(self) -> np.ndarray:
        """The whole permutation, materialised (for tests and checks; O(n) memory)."""
        if self._table is not None:
            return self._table.copy()
        step = 1 << 16
        parts = [
            self.at(np.arange(lo, min(lo + step, self.length), dtype=np.int64))
            for lo in range(0, self.length, step)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def strided_chunks(
    perm: RandomAccessPermutation | None,
    start: int,
    period: int,
    first: int,
    step: int,
    skip: int,
    count: int,
) -> Iterator[list[int]]:
    """Elements ``perm[start + (first + j * step) % period]`` for ``j`` in ``[skip, count)``, in chunks.

    Args:
        perm: The order (``None``: the identity).
        start: Offset added to every position.
        period: Positions wrap around after this many (> 0 when ``count > skip``).
        first: Position of ``j = 0`` before wrapping.
        step: Distance between consecutive positions.
        skip: First ``j``.
        count: End of ``j`` (exclusive).

    Yields:
        Lists of Python ints; chunk sizes start at ``_FIRST_CHUNK`` and double up to ``_MAX_CHUNK``, so the
        work before the first element is small and the work per element stays vectorised.
    """
    j, size = skip, _FIRST_CHUNK
    while j < count:
        stop = min(j + size, count)
        positions = start + (first + step * np.arange(j, stop, dtype=np.int64)) % period
        yield (perm.at(positions) if perm is not None else positions).tolist()
        j, size = stop, min(2 * size, _MAX_CHUNK)

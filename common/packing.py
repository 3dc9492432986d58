"""All fields of a batch as one mixed-radix integer.

A field with radix r holds a value in [0, r). Writing fields f_0, f_1, ... gives the integer
N = f_0 + r_0 * (f_1 + r_1 * (f_2 + ...)), and the batch costs ceil(log2(prod r_i)) bits, not a
ceiling per field. A reader peels fields in the same order, so the radix of a later field may
depend on the values of earlier ones (the support size K decides the radix of the support rank).
"""

from __future__ import annotations

import math


class PackingError(ValueError):
    """Packed bytes that cannot be a valid batch (too short, trailing data, value out of range)."""


class MixedRadixWriter:
    def __init__(self) -> None:
        self._fields: list[tuple[int, int]] = []
        self._capacity = 1  # product of the radices so far

    def write(self, value: int, radix: int) -> None:
        if radix < 1 or not 0 <= value < radix:
            raise ValueError(f"value {value} outside radix {radix}")
        self._fields.append((int(value), int(radix)))
        self._capacity *= int(radix)

    @property
    def capacity(self) -> int:
        """Number of distinct messages with these radices (product of radices)."""
        return self._capacity

    @property
    def bits(self) -> int:
        """ceil(log2(capacity)): the exact bit cost of the packed fields."""
        return (self._capacity - 1).bit_length()

    @property
    def log2_capacity(self) -> float:
        return log2_int(self._capacity)

    def to_int(self) -> int:
        n = 0
        for value, radix in reversed(self._fields):
            n = n * radix + value
        return n

    def to_bytes(self) -> bytes:
        """Little-endian bytes of the integer, ceil(bits / 8) of them (b'' for a 0-bit batch)."""
        return self.to_int().to_bytes((self.bits + 7) // 8, "little")


class MixedRadixReader:
    def __init__(self, data: bytes) -> None:
        self._n = int.from_bytes(data, "little")
        self._nbytes = len(data)
        self._capacity = 1

    def read(self, radix: int) -> int:
        if radix < 1:
            raise PackingError(f"radix {radix} < 1")
        self._capacity *= radix
        # Fail as soon as the fields outgrow the bytes: bounds the work a corrupt payload can cause.
        if (self._capacity - 1).bit_length() > 8 * self._nbytes:
            raise PackingError(f"payload of {self._nbytes} bytes is too short for its fields")
        self._n, value = divmod(self._n, radix)
        return value

    def finish(self) -> None:
        """Check that the bytes held exactly these fields: nothing left, no surplus byte."""
        if self._n != 0:
            raise PackingError("packed integer exceeds the fields it should hold (trailing or corrupt data)")
        expected = ((self._capacity - 1).bit_length() + 7) // 8
        if self._nbytes != expected:
            raise PackingError(f"packed payload is {self._nbytes} bytes, the fields need {expected}")


def log2_int(n: int) -> float:
    """log2 of a (possibly huge) positive int as a float."""
    if n <= 0:
        return float("-inf")
    shift = max(0, n.bit_length() - 64)
    return math.log2(n >> shift) + shift

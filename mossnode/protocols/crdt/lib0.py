"""A strict reader for lib0, the binary encoding under Yrs updates.

Yrs itself tolerates trailing bytes and decodes lazily; authorization needs the opposite: every
byte accounted for, every length bounded by the input, so a hostile update cannot make the
decoder allocate or loop beyond what it sent.
"""

from __future__ import annotations

import struct

MAX_VAR_BYTES = 10  # a u64 fits in 10 groups of 7 bits
MAX_ANY_DEPTH = 32


class DecodeError(ValueError):
    """The bytes are not a well-formed lib0 encoding."""


class Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.buf)

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise DecodeError(f"need {n} bytes at offset {self.pos}, input ends")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def u8(self) -> int:
        if self.pos >= len(self.buf):
            raise DecodeError(f"input ends at offset {self.pos}")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def var_uint(self) -> int:
        pos = self.pos
        if pos < len(self.buf) and self.buf[pos] < 0x80:  # the common one-byte case
            self.pos = pos + 1
            return self.buf[pos]
        value = 0
        for i in range(MAX_VAR_BYTES):
            b = self.u8()
            value |= (b & 0x7F) << (7 * i)
            if b < 0x80:
                if value >= 1 << 64:
                    raise DecodeError("varuint exceeds 64 bits")
                return value
        raise DecodeError("varuint longer than 10 bytes")

    def var_int(self) -> int:
        """lib0 signed varint: first byte holds sign (0x40) and 6 value bits."""
        b = self.u8()
        negative = bool(b & 0x40)
        value = b & 0x3F
        shift = 6
        more = b & 0x80
        count = 1
        while more:
            count += 1
            if count > MAX_VAR_BYTES:
                raise DecodeError("varint longer than 10 bytes")
            b = self.u8()
            value |= (b & 0x7F) << shift
            shift += 7
            more = b & 0x80
        return -value if negative else value

    def count(self, min_bytes_each: int = 1) -> int:
        """A length prefix, refused if the rest of the input cannot hold that many elements."""
        n = self.var_uint()
        if n * min_bytes_each > len(self.buf) - self.pos:
            raise DecodeError(f"length {n} exceeds the remaining input")
        return n

    def bytes_(self) -> bytes:
        return self._take(self.count())

    def string(self) -> str:
        raw = self.bytes_()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("string is not UTF-8") from None

    def any(self, depth: int = 0) -> object:
        """Skip-and-return one lib0 ``Any`` value (Yrs map/array primitive content)."""
        if depth > MAX_ANY_DEPTH:
            raise DecodeError("Any value nests too deep")
        tag = self.u8()
        if tag in (126, 127):  # null, undefined
            return None
        if tag == 125:
            return self.var_int()
        if tag == 124:
            return float(struct.unpack(">f", self._take(4))[0])
        if tag == 123:
            return float(struct.unpack(">d", self._take(8))[0])
        if tag == 122:
            return int(struct.unpack(">q", self._take(8))[0])
        if tag in (120, 121):
            return tag == 120
        if tag == 119:
            return self.string()
        if tag == 118:
            n = self.count(2)
            return {self.string(): self.any(depth + 1) for _ in range(n)}
        if tag == 117:
            return [self.any(depth + 1) for _ in range(self.count())]
        if tag == 116:
            return self.bytes_()
        raise DecodeError(f"unknown Any tag {tag}")


def var_uint(n: int) -> bytes:
    """Encode a lib0 unsigned varint."""
    if n < 0:
        raise ValueError("varuint is unsigned")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)

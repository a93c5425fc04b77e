"""Random access to the samples of a local WebDataset tar shard.

Exact resume needs to read "sample i of shard s" in any order, so instead of streaming a
shard front to back (and shuffling in a buffer whose state cannot be checkpointed), a worker
reads the shard's tar headers once (512 bytes per member, no data) and then seeks to the
members of the samples its plan asks for.

Samples are grouped exactly as webdataset groups them: consecutive members sharing a key,
where the key is the member path up to the first dot of its file name and the rest is the
extension (``dir/0001.000.jpg`` -> key ``dir/0001``, extension ``000.jpg``).
"""

from __future__ import annotations

import os
import tarfile
from typing import Any

import numpy as np

from lmm.errors import ShardFormatError

_GZIP_MAGIC = b"\x1f\x8b"


def split_member(name: str) -> tuple[str, str] | None:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``); None for names without extension."""
    head, sep, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (head + sep + stem, ext.lower())


class TarSamples:
    """Index of one uncompressed tar: sample -> [(extension, data offset, size)].

    A truncated tar keeps the samples whose members are complete; ``error`` says why the
    rest is missing (the caller counts the missing positions as ``shard_read`` skips).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys: list[str] = []
        self.members: list[list[tuple[str, int, int]]] = []
        self.error: str | None = None
        self._file: Any = None
        with open(path, "rb") as f:
            if f.read(2) == _GZIP_MAGIC:
                raise ShardFormatError(
                    f"{path}: compressed tar; training reads samples by offset and needs plain .tar shards "
                    "(re-write it uncompressed, e.g. with the data_prep converters)"
                )
        size = os.path.getsize(path)
        try:
            try:
                members = _scan(path, size)
            except (_Unusual, ValueError):  # (UnicodeDecodeError is a ValueError)
                members = _scan_with_tarfile(path)  # slower, but reads every tar dialect
        except tarfile.TarError as err:
            members, self.error = [], f"unreadable tar ({err})"
        for name, offset, length in members:
            if offset + length > size:
                self.error = f"member {name!r} is cut off (truncated shard)"
                break
            parts = split_member(name)
            if parts is None:
                continue
            key, ext = parts
            if not self.keys or self.keys[-1] != key:
                self.keys.append(key)
                self.members.append([])
            self.members[-1].append((ext, offset, length))
        if self.error is None and isinstance(members, _Partial):
            self.error = members.error
        if self.error and self.members:
            # The last sample may have lost members after the cut: do not hand out half a sample.
            self.keys.pop()
            self.members.pop()

    def __len__(self) -> int:
        return len(self.keys)

    def extensions(self, i: int) -> list[str]:
        return [ext for ext, _, _ in self.members[i]]

    def read(self, i: int) -> dict[str, Any]:
        """Sample ``i`` as webdataset would yield it: ``{"__key__", "__url__", ext: bytes}``."""
        if self._file is None:
            self._file = open(self.path, "rb")
        raw: dict[str, Any] = {"__key__": self.keys[i], "__url__": self.path}
        for ext, offset, size in self.members[i]:
            self._file.seek(offset)
            data = self._file.read(size)
            if len(data) != size:
                raise OSError(f"{self.path}: member {self.keys[i]}.{ext} is cut off")
            raw[ext] = data
        return raw

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict:  # an open file does not cross process boundaries
        state = dict(self.__dict__)
        state["_file"] = None
        return state


class _Unusual(Exception):
    """A header the fast scanner does not handle; tarfile takes over."""


class _Partial(list):
    """Members read before a tar turned out to be cut off or damaged."""

    error: str | None = None


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # base-256 (GNU, sizes >= 8 GiB)
        raise _Unusual
    text = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _Unusual from None


def _pax_path(data: bytes) -> str | None:
    path = None
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def _scan(path: str, size: int) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files, from 512-byte headers alone.

    ``tarfile`` builds a TarInfo per member and needs ~75 us each; a shard set of 40k
    samples then takes seconds to index, at every start and in every worker. Handles
    ustar, GNU long names and PAX path records; anything else raises ``_Unusual``.
    Header checksums are checked together at the end, before anything is returned (summing
    512 bytes in Python per header took about half the time).
    """
    out = _Partial()
    long_name: str | None = None
    headers: list[bytes] = []
    stored: list[int] = []
    with open(path, "rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            header = f.read(512)
            if len(header) < 512 or header == bytes(512):
                if len(header) and header != bytes(512):
                    out.error = "cut off inside a header (truncated shard)"
                elif (
                    not header
                ):  # a tar ends with zero blocks; a copy cut at a block boundary lacks them
                    out.error = "ends without the end-of-archive blocks (truncated shard)"
                break  # end of archive (or of what is left of it)
            headers.append(header)
            stored.append(_octal(header[148:156]))
            length = _octal(header[124:136])
            kind = header[156:157]
            data = offset + 512
            offset = data + (length + 511) // 512 * 512
            if kind in (b"L", b"x"):
                if length > min(
                    size - data, 1 << 20
                ):  # a damaged length must not decide how much is read
                    raise _Unusual
                f.seek(data)
                payload = f.read(length)
                long_name = (
                    payload.rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(payload)
                ) or long_name
                continue
            if kind not in (b"0", b"\0", b"7", b"5", b"1", b"2", b"g"):
                raise _Unusual
            if kind in (b"0", b"\0", b"7"):
                name = long_name
                if name is None:
                    name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                    prefix = (
                        header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                    )
                    if prefix:
                        name = prefix.decode("utf-8") + "/" + name
                out.append((name, data, length))
            long_name = None
    _check_sums(headers, stored)
    return out


def _check_sums(headers: list[bytes], stored: list[int]) -> None:
    """Raise ``_Unusual`` unless each header's checksum field holds the sum of its bytes with
    that field counted as spaces (a damaged header, or an old signed checksum: tarfile decides)."""
    if not headers:
        return
    h = np.frombuffer(b"".join(headers), dtype=np.uint8).reshape(len(headers), 512)
    sums = h[:, :148].sum(axis=1, dtype=np.int64) + h[:, 156:].sum(axis=1, dtype=np.int64) + 8 * 32
    if not np.array_equal(sums, np.asarray(stored, dtype=np.int64)):
        raise _Unusual


def _scan_with_tarfile(path: str) -> list[tuple[str, int, int]]:
    out = _Partial()
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    out.append((m.name, m.offset_data, m.size))
    except tarfile.TarError as err:
        if not out:
            raise
        out.error = f"unreadable tar ({err})"
    return out

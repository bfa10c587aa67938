"""Reading an ``.npz`` as untrusted input: every member checked before it is decoded, every read bounded.

``np.load`` allocates whatever shape a member's ``.npy`` header claims before reading any data
(a 2 MB member can ask for 16 GiB). :mod:`zipfile`'s LZMA reader decodes a whole input chunk
in one call (one ``read(4096)`` of a 10 KB member of zeros comes out as 64 MiB), with the
dictionary the member's properties claim (up to 4 GiB). :func:`read_npz` uses :mod:`zipfile`
only for the zip directory and decodes each member itself:

1. Names: every member is ``KEY.npy`` for a key of ``specs``, at most once; no encryption;
   stored, deflate or LZMA.
2. Headers: ``.npy`` magic, format 1.0 or 2.0, a header of at most :data:`MAX_HEADER_BYTES`
   parsed by numpy's literal parser; dtype kind and dimensions as the key allows (never object,
   structured or Fortran-ordered); the zip's size of the member equal to header plus data, and
   its compressed bytes inside the file.
3. Cap: the arrays, in the dtypes they are read into, take at most ``max_bytes`` in total.
4. Verify, then read: every member is first decoded with its output thrown away, in pieces of
   at most :data:`CHUNK` bytes (an LZMA dictionary no larger than the member), and must come
   out at exactly its declared size with its zip CRC-32. Only then are the arrays allocated
   and filled, with the same checks.

Peak memory is the arrays, plus one decoder's state (at most the writer's dictionary or the
member's size, whichever is smaller), plus a few pieces. A forged, truncated or corrupt member
fails before its array exists. Every fault is a ValueError naming the file and, when the fault
is inside a member, its key. The price is time: every member is decoded (a stored one read)
twice, about 1.6x np.load's time on LZMA traces.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import numpy as np

try:  # CPython builds without liblzma can still read stored and deflated members
    import lzma
except ImportError:  # pragma: no cover
    lzma = None  # type: ignore[assignment]

__all__ = ["MemberSpec", "read_npz", "default_max_bytes", "CHUNK", "MAX_HEADER_BYTES"]

CHUNK = 1 << 18  #: bytes read from the file, and at most decoded, per step
MAX_HEADER_BYTES = 10_000  #: longest accepted .npy header (numpy's own default limit)
CAP_BYTES_PER_FILE_BYTE = 256  #: default cap: array bytes per byte of file ...
CAP_FLOOR = 64 << 20  #: ... but at least this many (small files may compress very well) ...
CAP_CEILING = 4 << 30  #: ... and at most this many; pass max_bytes= for larger files

_NPY_MAGIC = b"\x93NUMPY"
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # 30 bytes: signature, ..., flags at [2], name/extra length last
_LOCAL_SIGNATURE = b"PK\x03\x04"
_END_RECORD = struct.Struct("<4s4H2LH")  # 22 bytes: signature, disks, entries here, entries, size, offset, comment
_END_SIGNATURE = b"PK\x05\x06"
_UTF8_NAME_FLAG = 0x800
_UNSUPPORTED_FLAGS = 0x1 | 0x20 | 0x40  # encrypted, patched data, strong encryption
_INT64_MAX = np.iinfo(np.int64).max
_CODEC_ERRORS = (zlib.error,) + ((lzma.LZMAError,) if lzma is not None else ())


def default_max_bytes(file_size: int) -> int:
    """Default cap on the arrays of a ``file_size``-byte file.

    The cap is 256 bytes of arrays per byte of file, at least 64 MiB and at most 4 GiB.
    Honest trace files compress 3-10x, so they stay far below it. A decompression bomb goes
    far above it and is refused before anything is decoded.
    """
    return min(CAP_CEILING, max(CAP_FLOOR, CAP_BYTES_PER_FILE_BYTE * file_size))


@dataclass(frozen=True)
class MemberSpec:
    """What one key of the ``.npz`` may hold.

    Attributes:
        kinds: numpy dtype kinds allowed, e.g. ``"iu"`` (integers) or ``"U"`` (unicode).
        ndim: the number of dimensions (0 for a scalar).
        dims: names of the dimensions, for messages, e.g. ``"[steps, micro_batches, layers, experts]"``.
        read_as: the dtype the array is read into (converted piece by piece), None to keep the stored one.
        required: whether the key must be present.
        max_bytes: a cap on this key's stored data, None for only the file-wide cap.
    """

    kinds: str
    ndim: int
    dims: str = ""
    read_as: np.dtype | None = None
    required: bool = True
    max_bytes: int | None = None


@dataclass(frozen=True)
class _Member:
    """One zip member: its key, the prefix of its messages, its directory entry and where its bytes start."""

    key: str
    where: str
    info: zipfile.ZipInfo
    data_start: int


@dataclass(frozen=True)
class _Layout:
    """A checked ``.npy`` member: its header's size, shape and stored dtype, and the dtype it is read into."""

    member: _Member
    header_size: int
    shape: tuple[int, ...]
    dtype: np.dtype
    out_dtype: np.dtype

    @property
    def out_bytes(self) -> int:
        return math.prod(self.shape) * self.out_dtype.itemsize


# --------------------------------------------------------------------------- decoders
class _Stored:
    """Pass-through "decoder" of a stored member (the input pieces are at most CHUNK bytes)."""

    needs_input = True
    eof = False

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return data


class _Inflate:
    """Raw deflate with the ``needs_input`` / ``eof`` / ``decompress(data, max_length)`` face of lzma's decoder."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)

    @property
    def needs_input(self) -> bool:
        return not self._z.unconsumed_tail

    @property
    def eof(self) -> bool:
        return self._z.eof

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return self._z.decompress(self._z.unconsumed_tail + data, max_length)


def _lzma(read_raw: Callable[[int], bytes], member: _Member) -> Any:
    """LZMA1 decoder of a zip member: 2 version bytes, a 2-byte properties size (5), the properties.

    The dictionary is clamped to the member's declared size: every match distance of an
    honest stream is shorter than the output before it, so the clamp changes nothing for an
    honest member. A forged one cannot make the decoder allocate the 4 GiB its header may claim.
    """
    head = read_raw(9)
    if len(head) < 9:
        raise ValueError(f"{member.where}: LZMA member too short for its properties ({len(head)} bytes)")
    props_size, props_byte, dict_size = struct.unpack_from("<HBI", head, 2)
    if props_size != 5 or props_byte >= 9 * 5 * 5:
        raise ValueError(f"{member.where}: LZMA properties are corrupt (size {props_size}, lc/lp/pb byte {props_byte})")
    pb, rest = divmod(props_byte, 45)
    lp, lc = divmod(rest, 9)
    dict_size = min(dict_size, max(4096, member.info.file_size))
    filters = [{"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}]
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters)


def _decoded_pieces(f: BinaryIO, member: _Member) -> Iterator[bytes]:
    """The member's decoded bytes in pieces of at most CHUNK bytes.

    Raises ValueError when they run past the size the zip directory declares (the decoder
    stops there), when they end short of it, or when they fail the CRC-32.
    """
    info, where = member.info, member.where
    position, raw_left = member.data_start, info.compress_size

    def read_raw(n: int) -> bytes:  # seeks every time: other readers may share the file object
        nonlocal position, raw_left
        f.seek(position)
        data = f.read(min(n, raw_left))
        position, raw_left = position + len(data), raw_left - len(data)
        return data

    produced = crc = 0
    try:
        if info.compress_type == zipfile.ZIP_LZMA:
            decoder: Any = _lzma(read_raw, member)
        else:
            decoder = _Inflate() if info.compress_type == zipfile.ZIP_DEFLATED else _Stored()
        while not decoder.eof:
            data = read_raw(CHUNK) if decoder.needs_input else b""
            out = decoder.decompress(data, CHUNK)
            if not out and not data:  # input used up, nothing more comes out
                break
            produced += len(out)
            if produced > info.file_size:
                raise ValueError(f"{where}: decodes to more than the {info.file_size} bytes the zip directory "
                                 "declares (a decompression bomb or a forged size)")
            crc = zlib.crc32(out, crc)
            yield out
    except _CODEC_ERRORS as exc:
        raise ValueError(f"{where}: compressed data is corrupt after {produced} decoded bytes "
                         f"({type(exc).__name__}: {exc})") from None
    if produced != info.file_size:
        raise ValueError(f"{where}: decodes to {produced} bytes, not the {info.file_size} the zip directory "
                         "declares (truncated or corrupt)")
    if crc != info.CRC:
        raise ValueError(f"{where}: fails its CRC-32 check (corrupt)")


class _Stream:
    """Exact-size reads from the front of a piece iterator, then the rest of it."""

    def __init__(self, pieces: Iterator[bytes], where: str) -> None:
        self._pieces, self._where, self._buffer = pieces, where, b""

    def read(self, n: int, what: str) -> bytes:
        while len(self._buffer) < n:
            piece = next(self._pieces, None)
            if piece is None:
                raise ValueError(f"{self._where}: ends inside {what}")
            self._buffer += piece
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def rest(self) -> Iterator[bytes]:
        if self._buffer:
            yield self._buffer
        self._buffer = b""
        yield from self._pieces


# --------------------------------------------------------------------------- zip directory
def _members(f: BinaryIO, file_size: int, specs: Mapping[str, MemberSpec], where: str) -> list[_Member]:
    """Check the zip directory's names and every member's local header; return the members."""
    if not zipfile.is_zipfile(f):
        raise ValueError(f"{where} is not an .npz (zip) archive")
    try:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
    # what zipfile raises on a corrupt directory: BadZipFile; UnicodeDecodeError (a ValueError)
    # for a name flagged UTF-8 that is not; OSError for a seek before the start;
    # NotImplementedError for a "version needed to extract" it does not know
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise ValueError(f"{where} is not a readable .npz (zip) archive: {exc}") from None
    listed = _listed_entries(f, file_size)
    if listed not in (len(infos), 0xFFFF):  # 0xFFFF: the count lives in a zip64 record
        # zipfile stops at the directory's declared size: an entry whose lengths were
        # corrupted can swallow the entries after it without any error
        raise ValueError(f"{where} is not a readable .npz (zip) archive: its end record lists {listed} members, "
                         f"its directory holds {len(infos)}")
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        if not name.endswith(".npy"):
            raise ValueError(f"{where}, key {name!r}: zip member {name!r} is not an .npy array; "
                             f"this file holds only {', '.join(k + '.npy' for k in specs)}")
        if name in seen:
            raise ValueError(f"{where}, key {name[:-4]!r}: zip member {name!r} appears more than once")
        seen.add(name)
    keys = sorted(name[:-4] for name in seen)
    unknown = [k for k in keys if k not in specs]
    if unknown:
        raise ValueError(f"{where} holds unknown key(s) {unknown}; it may hold {list(specs)}")
    missing = [k for k, spec in specs.items() if spec.required and k not in keys]
    if missing:
        raise ValueError(f"{where} lacks key(s) {missing}; it holds {keys}")
    order = {k: i for i, k in enumerate(specs)}
    infos = sorted(infos, key=lambda i: order[i.filename[:-4]])
    return [_local_member(f, file_size, info, f"{where}, key {info.filename[:-4]!r}") for info in infos]


def _listed_entries(f: BinaryIO, file_size: int) -> int:
    """The member count of the zip's end record, found as zipfile found it: the last 22 bytes when
    they hold one without comment, else the last signature in the file's last 64 KiB."""
    tail_size = min(file_size, _END_RECORD.size + 0xFFFF)
    f.seek(file_size - tail_size)
    tail = f.read(tail_size)
    last = tail[-_END_RECORD.size :]
    if last.startswith(_END_SIGNATURE) and last.endswith(b"\0\0"):
        return _END_RECORD.unpack(last)[4]
    return _END_RECORD.unpack_from(tail, tail.rfind(_END_SIGNATURE))[4]


def _local_member(f: BinaryIO, file_size: int, info: zipfile.ZipInfo, where: str) -> _Member:
    """Locate the member's compressed bytes through its local header, checking they lie inside the file."""
    if info.flag_bits & _UNSUPPORTED_FLAGS:
        raise ValueError(f"{where}: encrypted or patched zip members are not supported (flags {info.flag_bits:#x})")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA):
        raise ValueError(f"{where}: zip compression method {info.compress_type} is not supported "
                         "(stored, deflate and LZMA are)")
    if info.compress_type == zipfile.ZIP_LZMA and lzma is None:  # pragma: no cover
        raise ValueError(f"{where}: an LZMA member needs Python's lzma module, which this build lacks")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise ValueError(f"{where}: stored member's sizes disagree ({info.compress_size} stored, "
                         f"{info.file_size} declared)")
    if not 0 <= info.header_offset <= file_size - _LOCAL_HEADER.size:
        raise ValueError(f"{where}: its local zip header offset {info.header_offset} lies outside the file")
    f.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    name_length, extra_length = fields[-2:]
    raw_name = f.read(name_length)
    encoding = "utf-8" if fields[2] & _UTF8_NAME_FLAG else "cp437"
    if fields[0] != _LOCAL_SIGNATURE or raw_name.decode(encoding, errors="replace") != info.orig_filename:
        raise ValueError(f"{where}: its local zip header is corrupt (signature {fields[0]!r}, name {raw_name!r})")
    data_start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if data_start + info.compress_size > file_size:
        raise ValueError(f"{where}: its {info.compress_size} compressed bytes at offset {data_start} run past "
                         f"the end of the file ({file_size} bytes): truncated")
    return _Member(info.filename[:-4], where, info, data_start)


# --------------------------------------------------------------------------- .npy headers
def _layout(f: BinaryIO, member: _Member, spec: MemberSpec) -> _Layout:
    """Decode and check a member's ``.npy`` header (only its first bytes are decoded)."""
    where = member.where
    if member.info.file_size < 10:
        raise ValueError(f"{where}: not an .npy array ({member.info.file_size} bytes, too short for a header)")
    pieces = _decoded_pieces(f, member)
    stream = _Stream(pieces, where)
    try:
        magic = stream.read(8, "the .npy magic")
        if magic[:6] != _NPY_MAGIC:
            raise ValueError(f"{where}: not an .npy array (it does not start with the .npy magic)")
        version = (magic[6], magic[7])
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{where}: .npy format version {version[0]}.{version[1]} is not supported "
                             "(1.0 and 2.0 are)")
        length_format = "<H" if version == (1, 0) else "<I"
        length_bytes = stream.read(struct.calcsize(length_format), "the .npy header length")
        (header_length,) = struct.unpack(length_format, length_bytes)
        if header_length > MAX_HEADER_BYTES:
            raise ValueError(f"{where}: .npy header of {header_length} bytes is longer than {MAX_HEADER_BYTES}")
        header = stream.read(header_length, "the .npy header")
    finally:
        pieces.close()
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        shape, fortran_order, dtype = read_header(io.BytesIO(length_bytes + header),
                                                  max_header_size=MAX_HEADER_BYTES)
    # numpy's parser of an untrusted header raises ValueError, but on forged descriptors also
    # TypeError, IndexError, RecursionError, tokenize errors, ...: each means a malformed header
    except Exception as exc:
        raise ValueError(f"{where}: malformed .npy header ({type(exc).__name__}: {exc})") from None
    shape = tuple(shape)
    _check_header(where, spec, shape, fortran_order, dtype)
    header_size = 8 + len(length_bytes) + header_length
    data_bytes = math.prod(shape) * dtype.itemsize
    held = member.info.file_size - header_size
    if held != data_bytes:
        relation = "only" if held < data_bytes else "more than that:"
        raise ValueError(f"{where}: its .npy header declares shape {shape} {dtype} ({data_bytes} bytes), but "
                         f"the zip member holds {relation} {held} bytes after the header "
                         f"({'truncated' if held < data_bytes else 'trailing data'} or forged)")
    if spec.max_bytes is not None and data_bytes > spec.max_bytes:
        raise ValueError(f"{where}: {data_bytes} bytes of data, more than the {spec.max_bytes} allowed for this key")
    return _Layout(member, header_size, shape, dtype, np.dtype(spec.read_as) if spec.read_as else dtype)


def _check_header(where: str, spec: MemberSpec, shape: tuple, fortran_order: bool, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise ValueError(f"{where}: holds an object array (dtype {dtype}), which would need pickle (refused)")
    if dtype.kind not in spec.kinds or dtype.fields is not None or dtype.subdtype is not None:
        wanted = {"iu": "integers", "U": "unicode text"}.get(spec.kinds, f"dtype kind {spec.kinds!r}")
        raise ValueError(f"{where}: must hold {wanted}, got dtype {dtype}")
    if len(shape) != spec.ndim:
        wanted = "a scalar" if spec.ndim == 0 else f"{spec.ndim} dimensions {spec.dims}".rstrip()
        raise ValueError(f"{where}: must be {wanted}, got shape {shape}")
    if any(n < 0 for n in shape):
        raise ValueError(f"{where}: shape {shape} has a negative dimension")
    if fortran_order:
        raise ValueError(f"{where}: is stored in Fortran order; only C-ordered arrays are read")


# --------------------------------------------------------------------------- data
def _fill(out: np.ndarray, stored: np.dtype, pieces: Iterator[bytes], where: str) -> None:
    """Copy the member's data pieces into ``out``, converting from the ``stored`` dtype if it differs."""
    flat = out.reshape(-1)
    if out.dtype == stored:
        dest = flat.view(np.uint8) if out.nbytes else None
        pos = 0
        for piece in pieces:
            dest[pos : pos + len(piece)] = np.frombuffer(piece, np.uint8)
            pos += len(piece)
        return
    size, pending, pos = stored.itemsize, b"", 0
    for piece in pieces:
        data = pending + piece
        count = len(data) // size
        values = np.frombuffer(data, stored, count=count)
        if stored.kind == "u" and size == 8 and out.dtype == np.int64 and count and int(values.max()) > _INT64_MAX:
            index = np.unravel_index(pos + int(np.argmax(values > _INT64_MAX)), out.shape)
            raise ValueError(f"{where}: value {int(values.max())} at index {tuple(map(int, index))} is beyond int64")
        flat[pos : pos + count] = values
        pending, pos = data[count * size :], pos + count


def read_npz(path: str | os.PathLike, specs: Mapping[str, MemberSpec], *, max_bytes: int | None = None,
             label: str = "file") -> dict[str, np.ndarray]:
    """Read the arrays of an untrusted ``.npz`` without pickle and with bounded memory.

    Args:
        path: the file.
        specs: key (member name without ``.npy``) -> what it may hold; other keys are refused.
        max_bytes: cap on the arrays' total size as read; None uses :func:`default_max_bytes`
            of the file's size.
        label: how messages name the file, e.g. ``"trace file"``.

    Returns ``{key: array}`` for the keys present, each C-contiguous in its spec's ``read_as`` dtype.
    Raises FileNotFoundError for a missing file. Every other fault, in the archive or a member,
    raises ValueError naming the file (and the key). See the module docstring for the checks.
    """
    where = f"{label} {os.fspath(path)!r}"
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise
    except OSError as exc:  # a directory, no permission, ...
        raise ValueError(f"{where} cannot be read: {exc}") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        cap = default_max_bytes(file_size) if max_bytes is None else max_bytes
        layouts = [_layout(f, m, specs[m.key]) for m in _members(f, file_size, specs, where)]
        total = 0
        for layout in layouts:
            total += layout.out_bytes
            if total > cap:
                rule = ("max_bytes" if max_bytes is not None else
                        f"{CAP_BYTES_PER_FILE_BYTE} x the file's {file_size} bytes, at least {CAP_FLOOR >> 20} MiB, "
                        f"at most {CAP_CEILING >> 30} GiB; pass max_bytes= to allow more")
                raise ValueError(f"{layout.member.where}: the arrays would take {total} bytes in memory, more than "
                                 f"the limit of {cap} bytes ({rule})")
        for layout in layouts:  # verify every member before allocating any array
            for _ in _decoded_pieces(f, layout.member):
                pass
        arrays = {}
        for layout in layouts:
            stream = _Stream(_decoded_pieces(f, layout.member), layout.member.where)
            stream.read(layout.header_size, "the .npy header")
            arrays[layout.member.key] = out = np.empty(layout.shape, dtype=layout.out_dtype)
            _fill(out, layout.dtype, stream.rest(), layout.member.where)
    return arrays

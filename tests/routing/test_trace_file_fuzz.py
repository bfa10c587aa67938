"""Trace files as hostile input: truncated, flipped, forged, bombed, padded with junk.

Every case must end in one of two ways. Either ``load_trace`` raises a ValueError naming the
file (and the key, when the fault is inside a member), or, for a flipped byte in a field
no reader uses (a timestamp, say), it loads exactly the honest trace. Nothing else escapes,
and no different trace is returned silently.

Memory. A case's "honest size" is the bytes of the arrays of the honest trace it was made
from, as loaded (int64 loads, top_k, meta). The large cases must peak below 2x that size.
The peak is measured with ``tracemalloc``, which sees every allocation that matters here:
numpy's array data, Python's bytes objects, and the zlib and lzma decoder state (CPython
hands those libraries its PyMem_Raw allocator, so an LZMA dictionary counts in full). It does
not see torch's allocator. ``load_trace``'s torch steps allocate no large tensors, and
:func:`test_peak_rss_in_a_fresh_process` cross-checks that with ``ru_maxrss`` in a fresh
process, which sees everything. For the large LZMA base the zip is written by
:func:`write_zip` with a 1 MiB dictionary, not by ``save_trace``. ``save_trace`` writes through
zipfile, whose encoder uses an 8 MiB dictionary and takes ~40 s for 12 MiB on 2 CPUs. The
decoder needs min(dictionary, member) bytes on top of the array, so a save_trace file with
less than ~10 MiB of loads peaks near 2x when it loads honestly. The small bases (~1 KB),
swept byte by byte, are checked for outcomes only: fixed buffers dominate their memory.
"""

from __future__ import annotations

import functools
import io
import json
import lzma
import os
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
import torch

from relibra.routing.npz_reader import CHUNK
from relibra.routing.trace_file import TraceSequences, load_trace, save_trace

STORED, DEFLATED, LZMA = 0, 8, 14
LOADS_SHAPE = (2, 4, 16, 4096)  # 4 MiB of int64 loads: the large bases
META = {"model": "fuzz", "steps": 2}
ARCHIVE_FAULTS = ("is not an .npz (zip) archive", "is not a readable .npz (zip) archive")


# --------------------------------------------------------------------------- writing zips by hand
def npy(array: np.ndarray | None = None, *, header: str | None = None, data: bytes | None = None,
        version: tuple[int, int] = (1, 0)) -> bytes:
    """An .npy member: ``array`` as numpy writes it, or a forged ``header`` dict text and ``data``."""
    if header is None:
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
        return buffer.getvalue()
    length_format = "<H" if version[0] == 1 else "<I"
    text = header.encode("latin1")
    text += b" " * (-(8 + struct.calcsize(length_format) + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack(length_format, len(text)) + text + (data or b"")


@functools.lru_cache(maxsize=16)
def compress(data: bytes, method: int) -> bytes:
    if method == DEFLATED:
        z = zlib.compressobj(1, zlib.DEFLATED, -15)
        return z.compress(data) + z.flush()
    if method == LZMA:  # zip's LZMA member: version, properties size, properties, raw LZMA1 (end marker)
        dict_size, lc, lp, pb = 1 << 20, 3, 0, 2
        encoder = lzma.LZMACompressor(lzma.FORMAT_RAW, filters=[
            {"id": lzma.FILTER_LZMA1, "preset": 0, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}])
        props = bytes([(pb * 5 + lp) * 9 + lc]) + struct.pack("<I", dict_size)
        return b"\x09\x04\x05\x00" + props + encoder.compress(data) + encoder.flush()
    return data


def write_zip(path, members) -> None:
    """A zip of ``(name, member bytes, method[, declared size[, crc]])``. A declared size or CRC
    that differs from the bytes' forges the directory (zip64 fields when a size passes 4 GiB)."""
    out, central = bytearray(), bytearray()
    for name, data, method, *forged in members:
        packed, raw_name = compress(data, method), name.encode()
        size = forged[0] if forged else len(data)
        crc = forged[1] if len(forged) > 1 else zlib.crc32(data)
        zip64 = max(size, len(packed)) >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, size, len(packed)) if zip64 else b""
        sizes = (0xFFFFFFFF, 0xFFFFFFFF) if zip64 else (len(packed), size)
        flags, version = (2, 63) if method == LZMA else (0, 45)
        common = (flags, method, 0, 0x21, crc, *sizes, len(raw_name), len(extra))
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", version, *common) + raw_name + extra + packed
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", version, version, *common, 0, 0, 0, 0,
                               offset) + raw_name + extra
    count = len(members)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(central), len(out), 0)
    with open(path, "wb") as f:
        f.write(bytes(out + central + end))


def trace_members(loads: np.ndarray, method: int, top_k: int = 8, meta: dict | None = META) -> list:
    members = [("loads.npy", npy(loads), method), ("top_k.npy", npy(np.asarray(top_k, np.int64)), method)]
    if meta is not None:
        members.append(("meta.npy", npy(np.asarray(json.dumps(meta))), method))
    return members


# --------------------------------------------------------------------------- checking one case
def load_measured(path) -> tuple[object, int]:
    """``(trace or ValueError, tracemalloc peak in bytes)`` of one load_trace call."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        try:
            result = load_trace(path)
        except ValueError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def names_file_and_key(message: str, path, key: str | None) -> bool:
    if f"trace file {str(path)!r}" not in message:
        return False
    if key is not None:
        return f"key {key!r}" in message
    return "key '" in message or "key(s) [" in message or any(f in message for f in ARCHIVE_FAULTS)


def same_trace(trace, honest) -> bool:
    same = torch.equal(trace.loads, honest.loads) and trace.top_k == honest.top_k and trace.meta == honest.meta
    if trace.sequences is None or honest.sequences is None:
        return same and trace.sequences is honest.sequences is None
    a, b = trace.sequences, honest.sequences
    return same and a.tokens_per_micro_batch == b.tokens_per_micro_batch and all(
        torch.equal(getattr(a, k), getattr(b, k)) for k in ("loads", "tokens", "prompt", "micro_batch_of"))


class Base:
    """An honest trace file written as ``members`` by write_zip, with its honest arrays' size."""

    def __init__(self, directory, name: str, method: int, loads: np.ndarray):
        self.directory, self.method, self.loads = directory, method, loads
        self.members = trace_members(loads, method)
        self.path = directory / f"{name}.npz"
        write_zip(self.path, self.members)
        self.honest_bytes = loads.astype(np.int64).nbytes + 8 + 4 * len(json.dumps(META))
        self.trace = load_trace(self.path)
        self.count = 0

    def case(self, members=None, blob: bytes | None = None):
        self.count += 1
        path = self.directory / f"case{self.count}.npz"
        if blob is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zipfile warns about duplicate names
                write_zip(path, self.members if members is None else members)
        else:
            path.write_bytes(blob)
        return path

    def replaced(self, key: str, data: bytes, *declared: int) -> list:
        return [(n, data, m, *declared) if n == key + ".npy" else (n, d, m) for n, d, m in self.members]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    loads = np.random.default_rng(0).integers(0, 16, size=LOADS_SHAPE)
    return [Base(directory, name, method, loads) for name, method in
            (("stored", STORED), ("deflate", DEFLATED), ("lzma", LZMA))]


def expect_rejected(base: Base, path, key: str | None, peaks: list, what: str = "") -> str:
    result, peak = load_measured(path)
    assert isinstance(result, ValueError), f"{what} ({path.name}) loaded; expected a ValueError about key {key!r}"
    message = str(result)
    assert names_file_and_key(message, path, key), (what, message)
    assert peak < 2 * base.honest_bytes, f"{what}: {message}: peak {peak} bytes >= 2 x {base.honest_bytes}"
    peaks.append(peak)
    return message


# --------------------------------------------------------------------------- the cases
def forged_headers(loads: np.ndarray) -> list[tuple[str, str, bytes]]:
    """``(what, header text, data)`` of loads members whose .npy header lies or is malformed."""
    data = loads.tobytes()
    shape = loads.shape
    bigger = (shape[0] * 2,) + shape[1:]
    smaller = (shape[0] - 1,) + shape[1:]
    h = "{{'descr': {!r}, 'fortran_order': {}, 'shape': {}, }}".format
    return [
        ("shape claims more", h("<i8", False, bigger), data),
        ("shape claims less", h("<i8", False, smaller), data),
        ("3 dimensions", h("<i8", False, (shape[0] * shape[1],) + shape[2:]), data),
        ("negative dimension", h("<i8", False, (-1,) + shape[1:]), data),
        ("int32 descr over int64 data", h("<i4", False, shape), data),
        ("float descr", h("<f8", False, shape), data),
        ("object descr", h("|O", False, shape), data),
        ("structured descr", h([("a", "<i4"), ("b", "<i4")], False, shape), data),
        ("subarray descr", "{'descr': ('<i8', (2,)), 'fortran_order': False, 'shape': (2, 4, 16, 2048), }", data),
        ("fortran order", h("<i8", True, shape), data),
        ("garbage descr", h("<zz", False, shape), data),
        ("descr an int", "{'descr': 7, 'fortran_order': False, 'shape': (2, 4, 16, 4096), }", data),
        ("shape not ints", "{'descr': '<i8', 'fortran_order': False, 'shape': ('a',), }", data),
        ("missing key", "{'descr': '<i8', 'shape': (2, 4, 16, 4096), }", data),
        ("not a dict", "[1, 2, 3]", data),
        ("unparsable", "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 4, 16, 4096)", data),
        ("nested parens", "(" * 5000 + ")" * 5000, data),
        ("huge int", "{'descr': '<i8', 'fortran_order': False, 'shape': (" + "9" * 5000 + ",), }", data),
    ]


def test_forged_headers(bases):
    peaks = []
    for base in bases:
        for what, header, data in forged_headers(base.loads):
            # rejected from the header alone: a compressed base gets 64 KiB of data (fast to write)
            data = data if base.method == STORED else data[: 64 << 10]
            expect_rejected(base, base.case(base.replaced("loads", npy(header=header, data=data))), "loads", peaks,
                            what)
        # magic, version, header length
        raw = npy(base.loads)
        for what, blob in [("bad magic", b"\x93NUMPZ" + raw[6:]), ("version 3.0", raw[:6] + b"\x03\x00" + raw[8:]),
                           ("header length 60000", raw[:8] + struct.pack("<H", 60000) + raw[10:]),
                           ("v2 header length 4 GiB", npy(header="{}", version=(2, 0))[:8] + b"\xff\xff\xff\xff")]:
            expect_rejected(base, base.case(base.replaced("loads", blob)), "loads", peaks, what)


def test_bombs_refused_before_decoding(bases, tmp_path):
    """Headers (and zip directories) that claim far more than the file holds."""
    peaks = []
    u8 = "{{'descr': '|u1', 'fortran_order': False, 'shape': ({},), }}".format
    i8 = "{'descr': '<i8', 'fortran_order': False, 'shape': (1024, 1024, 1024, 1024), }"
    zeros = bytes(2 << 20)  # 2 MB of real data (deflated to ~2 KB)
    cases = [  # (header, data, size the zip directory declares: None for the true one)
        (u8(16 << 30), zeros, None),  # the bomb: 2 MB of uint8 claiming 16 GiB, the zip truthful
        (u8(16 << 30), zeros, 16 << 30),  # the zip directory forged to agree (zip64): the cap
        (i8, zeros, 8 << 40),  # 8 TiB of int64, zip forged to agree
        (u8(7 << 20), zeros, 7 << 20),  # 56 MiB as int64, under the cap, more than the stream holds
    ]
    for base in bases:
        for header, data, claimed in cases:
            member = npy(header=header, data=data)
            forged = () if claimed is None else (len(member) - len(data) + claimed,)
            expect_rejected(base, base.case(base.replaced("loads", member, *forged)), "loads", peaks)
    # a real bomb: the stream truly inflates far past the size it declares
    for method in (DEFLATED, LZMA):
        member = npy(header="{'descr': '|u1', 'fortran_order': False, 'shape': (1, 1, 1, 64), }",
                     data=bytes(32 << 20))
        path = tmp_path / f"bomb{method}.npz"
        write_zip(path, [("loads.npy", member, method, 128 + 64), ("top_k.npy", npy(np.int64(2)), STORED)])
        result, peak = load_measured(path)
        assert isinstance(result, ValueError) and "decodes to more than" in str(result), result
        assert peak < 8 * CHUNK, peak  # a few pieces, never the 32 MiB
        peaks.append(peak)
    print(f"\nbomb peaks: max {max(peaks) / 2**20:.2f} MiB")


def test_truncated_flipped_and_junk_members(bases):
    peaks = []
    for base in bases:
        raw = npy(base.loads)
        # member truncations: the zip is consistent, the .npy inside is cut
        header_end = len(raw) - base.loads.nbytes
        for cut in (0, 3, 6, 9, 40, header_end, header_end + 1000, len(raw) - 1):
            expect_rejected(base, base.case(base.replaced("loads", raw[:cut])), "loads", peaks)
        # not .npy members
        expect_rejected(base, base.case(base.replaced("loads", b"loads,as,csv\n1,2,3\n")), "loads", peaks)
        for junk in ("readme.txt", "loads", "dir/"):
            message = expect_rejected(base, base.case(base.members + [(junk, b"hello", base.method)]), junk, peaks)
            assert "not an .npy array" in message
        expect_rejected(base, base.case(base.members + [("extra.npy", npy(np.zeros(1)), base.method)]), None, peaks)
        # duplicate names: np.load would silently take one of them
        twin = ("loads.npy", npy(np.zeros(LOADS_SHAPE, np.int64)), base.method)
        message = expect_rejected(base, base.case(base.members + [twin]), "loads", peaks)
        assert "more than once" in message
        # values the .npy format allows but a trace does not (decoded in full, arrays allocated)
        negative = base.loads.copy()
        negative[1, 2, 3, 4] = -5
        huge = base.loads.copy()
        huge[0, 0, 0, :2] = 2**62
        for key, member, needle in [
            ("loads", npy(negative), "negative load -5 at index (1, 2, 3, 4)"),
            ("loads", npy(huge), "passes it at index (0, 0, 0, 1)"),
            ("loads", npy(base.loads.astype(np.uint64) + np.uint64(2**63)), "beyond int64"),
            ("top_k", npy(np.int64(0)), "top_k must be a positive int"),
            ("meta", npy(np.asarray("{not json")), "not valid JSON"),
            ("meta", npy(np.asarray("x" * (2 << 20))), "more than the"),
        ]:
            message = expect_rejected(base, base.case(base.replaced(key, member)), key, peaks)
            assert needle in message
        # the zip's CRC: one bit of the member changed after its CRC was taken
        flipped = raw[:-1] + bytes([raw[-1] ^ 1])
        message = expect_rejected(base, base.case(base.replaced("loads", flipped, len(raw), zlib.crc32(raw))),
                                  "loads", peaks)
        assert "CRC-32" in message
    print(f"\nmember-fault peaks: max {max(peaks) / 2**20:.2f} MiB, "
          f"honest size {bases[0].honest_bytes / 2**20:.2f} MiB")


def test_truncations_and_flipped_bytes_of_large_files(bases):
    peaks, loaded_same, rejected = [], 0, 0
    for base in bases:
        blob = base.path.read_bytes()
        directory = blob.index(b"PK\x01\x02")
        truncations = [1, 22, 30, 100, directory // 2, directory - 1, directory, len(blob) - 22, len(blob) - 1]
        for cut in truncations:
            expect_rejected(base, base.case(blob=blob[:cut]), None, peaks)
        data_start = 30 + len("loads.npy")
        # the fields of the local header, the first directory entry and the end record; the data
        local = [0, 6, 8, 14, 26, 28, 34]  # signature, flags, method, CRC copy, name length, extra length, name
        entry = [directory + k for k in (0, 10, 16, 20, 24, 28, 30, 32, 42, 46)]  # ... sizes, lengths, offset, name
        end = [len(blob) - 22 + k for k in (0, 10, 12, 16, 20)]  # signature, count, size, offset, comment length
        data = [data_start + k for k in (0, 9, 100)] + [directory // 2, directory - 30]
        flips = local + entry + end + data
        for offset in flips:
            path = base.case(blob=blob[:offset] + bytes([blob[offset] ^ 0xFF]) + blob[offset + 1 :])
            result, peak = load_measured(path)
            assert peak < 2 * base.honest_bytes, (offset, peak)
            peaks.append(peak)
            if isinstance(result, ValueError):
                assert names_file_and_key(str(result), path, None), str(result)
                rejected += 1
            else:  # a field no reader looks at (version, the local header's copies of CRC and sizes)
                assert same_trace(result, base.trace), f"flip at {offset} loaded a different trace"
                loaded_same += 1
        assert rejected > loaded_same
    print(f"\nlarge-file peaks: max {max(peaks) / 2**20:.2f} MiB of {2 * bases[0].honest_bytes / 2**20:.2f} allowed; "
          f"{loaded_same} harmless flips loaded the honest trace")


def test_honest_loads_peak(bases):
    for base in bases:
        trace, peak = load_measured(base.path)
        assert same_trace(trace, base.trace)
        assert peak < 2 * base.honest_bytes
        print(f"\nhonest {base.path.name}: {os.path.getsize(base.path)} bytes on disk, "
              f"peak {peak / 2**20:.2f} MiB = {peak / base.honest_bytes:.2f} x {base.honest_bytes / 2**20:.2f} MiB")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # a flipped descr can spell a deprecated alias
def test_every_byte_of_small_files(tmp_path):
    """Truncations and flipped bytes (every other byte) of ~1 KB files as save_trace, np.savez and
    np.savez_compressed write them."""
    loads = np.random.default_rng(1).integers(0, 50, size=(2, 2, 3, 8))
    save_trace(tmp_path / "lzma.npz", loads, 2, meta={"m": 1})
    np.savez_compressed(tmp_path / "deflate.npz", loads=loads, top_k=np.int64(2), meta=np.asarray('{"m": 1}'))
    np.savez(tmp_path / "stored.npz", loads=loads, top_k=np.int64(2))
    save_trace(tmp_path / "v2.npz", *small_sequence_trace())  # format 2: the per-sequence keys too
    outcomes = {"ValueError": 0, "loaded-same": 0}
    for name in ("lzma", "deflate", "stored", "v2"):
        honest = load_trace(tmp_path / f"{name}.npz")
        blob = (tmp_path / f"{name}.npz").read_bytes()
        cases = [blob[:cut] for cut in range(0, len(blob), 7)]  # every truncation loses the end record
        cases += [blob[:i] + bytes([blob[i] ^ (0x01 if i % 4 else 0x80)]) + blob[i + 1 :]
                  for i in range(0, len(blob), 2)]
        for i, case in enumerate(cases):
            path = tmp_path / f"c{i}.npz"
            path.write_bytes(case)
            try:
                trace = load_trace(path)
            except ValueError as exc:
                assert names_file_and_key(str(exc), path, None), str(exc)
                outcomes["ValueError"] += 1
            else:
                assert same_trace(trace, honest), f"{name} case {i} loaded a different trace"
                outcomes["loaded-same"] += 1
    assert outcomes["ValueError"] > 3 * outcomes["loaded-same"]
    print(f"\nsmall files: {outcomes}")


def small_sequence_trace() -> tuple:
    """``(loads, top_k, meta, sequences)`` of a ~1 KB per-sequence trace: 1 step, 3 sequences (one
    padding row), 2 micro-batches of at most 6 tokens, 1 layer, 4 experts, top-2."""
    seq_loads = np.array([[[3, 1, 0, 0]], [[0, 2, 2, 4]], [[0, 0, 0, 0]]], np.int32)[None]
    sequences = TraceSequences(torch.from_numpy(seq_loads), torch.tensor([[2, 4, 0]]), torch.tensor([[0, 0, -1]]),
                               torch.tensor([[1, 0, -1]]), 6)
    loads = np.array([[[[0, 2, 2, 4]], [[3, 1, 0, 0]]]])
    return loads, 2, {"m": 2}, sequences


def test_forged_sequence_members(tmp_path):
    """The per-sequence keys go through the same bounded reader: forged headers and bombs are
    refused by key before any array is allocated."""
    loads, top_k, meta, sequences = small_sequence_trace()
    honest = {**sequences.arrays(), "loads": loads, "top_k": np.int64(top_k)}
    h = "{{'descr': {!r}, 'fortran_order': False, 'shape': {}, }}".format
    cases = [
        ("sequence_loads", h("<i4", (1, 3, 1)), bytes(12), "must be 4 dimensions"),
        ("sequence_loads", h("|O", (1, 3, 1, 4)), bytes(96), "object array"),
        ("sequence_loads", h("<f4", (1, 3, 1, 4)), bytes(48), "must hold integers"),
        ("sequence_tokens", h("<i8", (3,)), bytes(24), "must be 2 dimensions [steps, sequences]"),
        ("micro_batch_of", h("<i8", (1, 3)), bytes(8), "only 8 bytes after the header"),
        ("tokens_per_micro_batch", h("<i8", (2,)), bytes(16), "must be a scalar"),
        ("sequence_prompt", h("|u1", (1 << 17, 1 << 17)), bytes(1 << 10), "more than the"),
    ]
    for key, header, data, needle in cases:
        members = [(k + ".npy", npy(header=header, data=data) if k == key else npy(np.asarray(v)), DEFLATED)
                   for k, v in honest.items()]
        if key == "sequence_prompt":  # a bomb whose zip directory agrees with its header
            members = [(n, d, m, len(d) - len(data) + (1 << 34)) if n == key + ".npy" else (n, d, m)
                       for n, d, m in members]
        path = tmp_path / f"{key}.npz"
        write_zip(path, members)
        result, peak = load_measured(path)
        assert isinstance(result, ValueError) and names_file_and_key(str(result), path, key), (key, result)
        assert needle in str(result), (key, str(result))
        assert peak < 4 * CHUNK, (key, peak)


_RSS_PROBE = """
import sys
from relibra.routing.trace_file import load_trace

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024

for path in sys.argv[1:3]:  # warm up: imports, first use of each torch op (code pages, thread pools)
    try:
        load_trace(path)
    except ValueError:
        pass
for path in sys.argv[3:]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = status("VmRSS")
    try:
        load_trace(path)
        outcome = "loaded"
    except ValueError:
        outcome = "ValueError"
    print(status("VmHWM") - before, outcome)
"""


def test_peak_rss_in_a_fresh_process(bases):
    """Resident memory, which torch's allocations count in too, of the honest large loads and of
    the faults that get as far as allocating arrays or claim the most, one load at a time.

    Peak RSS is reset before each load (``/proc/self/clear_refs``). glibc's mmap threshold is
    pinned, so every large block is returned to the system when freed and cannot hide the next
    load's growth.
    """
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    paths = [str(b.path) for b in bases]
    for base in bases:
        huge = base.loads.copy()
        huge[0, 0, 0, :2] = 2**62
        paths.append(str(base.case(base.replaced("loads", npy(huge)))))
        bomb = npy(header="{'descr': '|u1', 'fortran_order': False, 'shape': (17179869184,), }", data=bytes(1 << 20))
        paths.append(str(base.case(base.replaced("loads", bomb, len(bomb) - (1 << 20) + (16 << 30)))))
    warm, warm_overflow = bases[0].directory / "warm.npz", bases[0].directory / "warm_overflow.npz"
    save_trace(warm, np.ones((1, 1, 1, 8), np.int64), 1)
    write_zip(warm_overflow, trace_members(np.full((1, 1, 1, 8), 2**62), STORED))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(warm), str(warm_overflow), *paths],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert [r[1] for r in rows] == ["loaded"] * 3 + ["ValueError"] * 6
    growth = [int(r[0]) for r in rows]
    print("\npeak RSS growth per load (MiB; honest stored, deflate, lzma, then overflow and bomb per base): "
          + ", ".join(f"{g / 2**20:.2f}" for g in growth)
          + f"  (honest size {bases[0].honest_bytes / 2**20:.2f} MiB)")
    assert max(growth[:3]) > bases[0].honest_bytes // 2  # it does see the honest arrays
    assert max(growth) < 2 * bases[0].honest_bytes

"""Checking a JPEG file before it is decoded: libjpeg decodes a corrupt JPEG without failing.

Garbage bytes mid-file, a stretch cut out of it, a file cut short after a marker: libjpeg only *warns*
("Corrupt JPEG data: premature end of data segment", "N extraneous bytes before marker"), fills what it could
not decode with grey, and neither imagecodecs nor PIL passes the warning on. The converted slide would then
carry scrambled or grey blocks under real spots, silently. `check_jpeg` raises what those warnings would have
said, as a FedstError naming the file:

- every file: the marker segments are walked (lengths inside the file, a frame header before the first scan,
  an end-of-image marker);
- sequential Huffman-coded JPEGs (baseline/extended: what scanners, PIL and libjpeg write by default): every
  Huffman code of every block is decoded (no inverse DCT, so it costs a fraction of the decode) and each scan
  must end exactly where its last block does, with restart markers present and in sequence. That is the check
  libjpeg makes when it warns, made strict.

Progressive, arithmetic-coded and lossless JPEGs get the marker walk only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from shared.errors import FedstError

SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)  # SOF0 baseline, SOF1 extended sequential
FRAME_MARKERS = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # SOFn (C4 DHT, C8 reserved, CC DAC)
DHT, SOS, DRI, EOI, SOI = 0xC4, 0xDA, 0xDD, 0xD9, 0xD8
RST = range(0xD0, 0xD8)

# statuses of the entropy walk
OK, BAD_CODE, PREMATURE_END, EXTRANEOUS, BAD_RESTART, RUN_PAST_BLOCK = range(6)


@dataclass
class _Scan:
    start: int  # first byte of the entropy-coded data
    end: int  # the byte where the marker after it begins
    components: list[tuple[int, int, int]]  # (component id, DC table, AC table)
    spectral: tuple[int, int, int]  # Ss, Se, Ah << 4 | Al
    tables: dict[tuple[int, int], np.ndarray]  # (class, id) -> (counts[16], symbols) as one array, at this scan
    restart: int


@dataclass
class _Frame:
    marker: int
    height: int
    width: int
    components: dict[int, tuple[int, int]]  # id -> (H, V), in frame order


def _corrupt(path: str | os.PathLike, what: str) -> FedstError:
    return FedstError(f"{path}: unreadable or corrupt image ({what}; expected a complete, uncorrupted JPEG)")


def _marker_ends(data: np.ndarray) -> np.ndarray:
    """Offsets of every 0xFF that starts a marker inside or after entropy-coded data: not a stuffed 0xFF00 and
    not a restart marker (which belong to the scan)."""
    ff = np.flatnonzero(data[:-1] == 0xFF)
    following = data[ff + 1]
    return ff[(following != 0x00) & ((following < 0xD0) | (following > 0xD7))]


def parse_jpeg(path: str | os.PathLike, raw: bytes) -> tuple[_Frame, list[_Scan]]:
    """The frame header and the scans of a JPEG; FedstError naming ``path`` when its structure is broken."""
    data = np.frombuffer(raw, dtype=np.uint8)
    n = len(data)
    if n < 4 or raw[:2] != b"\xff\xd8":
        raise _corrupt(path, "no JPEG start-of-image marker")
    ends = _marker_ends(data)
    frame: _Frame | None = None
    tables: dict[tuple[int, int], np.ndarray] = {}
    restart = 0
    scans: list[_Scan] = []
    pos = 2
    while True:
        if pos >= n:
            raise _corrupt(path, "truncated JPEG: no end-of-image marker")
        if data[pos] != 0xFF:
            raise _corrupt(
                path, f"corrupt JPEG data: byte 0x{data[pos]:02x} at offset {pos} where a marker was expected"
            )
        while pos < n and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= n:
            raise _corrupt(path, "truncated JPEG: no end-of-image marker")
        code = int(data[pos])
        pos += 1
        if code == EOI:
            break
        if code in (0x00, 0x01, SOI) or code in RST:
            raise _corrupt(path, f"unexpected JPEG marker 0xff{code:02x} at offset {pos - 2}")
        if pos + 2 > n:
            raise _corrupt(path, "truncated JPEG: no end-of-image marker")
        length = int(data[pos]) << 8 | int(data[pos + 1])
        end = pos + length
        if length < 2 or end > n:
            raise _corrupt(path, f"truncated JPEG: marker 0xff{code:02x} at offset {pos - 2} runs past the file")
        body = raw[pos + 2 : end]
        try:
            if code in FRAME_MARKERS:
                frame = _parse_frame(code, body)
            elif code == DHT:
                _parse_tables(body, tables)
            elif code == DRI:
                restart = int(body[0]) << 8 | int(body[1])
            elif code == SOS:
                if frame is None:
                    raise ValueError("scan before the frame header")
                count = body[0]
                components = [(body[1 + 2 * i], body[2 + 2 * i] >> 4, body[2 + 2 * i] & 15) for i in range(count)]
                spectral = (body[1 + 2 * count], body[2 + 2 * count], body[3 + 2 * count])
                unknown = [c for c, _, _ in components if c not in frame.components]
                if not 1 <= count <= 4 or unknown:
                    raise ValueError(f"scan of {count} component(s) with ids not in the frame: {unknown}")
                following = ends[np.searchsorted(ends, end)] if len(ends) and ends[-1] >= end else n
                if following >= n:
                    raise _corrupt(path, "truncated JPEG: no end-of-image marker")
                scans.append(_Scan(end, int(following), components, spectral, dict(tables), restart))
                pos = int(following)
                continue
        except (IndexError, ValueError) as exc:
            raise _corrupt(path, f"malformed JPEG marker 0xff{code:02x} at offset {pos - 2}: {exc}") from None
        pos = end
    if frame is None or not scans:
        raise _corrupt(path, "JPEG without a frame header or image data")
    return frame, scans


def _parse_frame(code: int, body: bytes) -> _Frame:
    height, width, count = body[1] << 8 | body[2], body[3] << 8 | body[4], body[5]
    components = {body[6 + 3 * i]: (body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(count)}
    if not components or any(not (1 <= h <= 4 and 1 <= v <= 4) for h, v in components.values()):
        raise ValueError(f"{count} component(s) with sampling factors {list(components.values())}")
    return _Frame(code, height, width, components)


def _parse_tables(body: bytes, tables: dict[tuple[int, int], np.ndarray]) -> None:
    at = 0
    while at < len(body):
        kind, ident = body[at] >> 4, body[at] & 15
        counts = np.frombuffer(body[at + 1 : at + 17], dtype=np.uint8)
        total = int(counts.sum())
        symbols = np.frombuffer(body[at + 17 : at + 17 + total], dtype=np.uint8)
        if kind > 1 or ident > 3 or len(counts) != 16 or len(symbols) != total:
            raise ValueError(f"Huffman table class {kind} id {ident} is cut short or invalid")
        tables[(kind, ident)] = np.concatenate([counts, symbols])
        at += 17 + total


def _lookup_table(spec: np.ndarray, dc: bool) -> np.ndarray:
    """``code length << 8 | symbol`` for every 16-bit prefix of the canonical Huffman code (JPEG Annex C);
    a table libjpeg would refuse (over-full, a DC symbol above 15) raises ValueError, as libjpeg does."""
    counts, symbols = spec[:16], spec[16:]
    if dc and len(symbols) and int(symbols.max()) > 15:
        raise ValueError("DC Huffman table with a symbol above 15")
    lut = np.zeros(1 << 16, dtype=np.int32)
    code = k = 0
    for length in range(1, 17):
        for _ in range(int(counts[length - 1])):
            shift = 16 - length
            lut[code << shift : (code + 1) << shift] = length << 8 | int(symbols[k])
            code += 1
            k += 1
        if code >= 1 << length and counts[length - 1]:
            raise ValueError("over-full Huffman table")
        code <<= 1
    return lut


def check_jpeg(path: str | os.PathLike, raw: bytes) -> None:
    """FedstError naming ``path`` unless the JPEG in ``raw`` is complete and its entropy-coded data decodes
    cleanly (see the module docstring for what is checked on which kind of JPEG)."""
    frame, scans = parse_jpeg(path, raw)
    if frame.marker not in SEQUENTIAL_HUFFMAN or frame.height == 0:
        return  # progressive/arithmetic/lossless, or a height given later by DNL: the marker walk only
    data = np.frombuffer(raw, dtype=np.uint8)
    hmax = max(h for h, _ in frame.components.values())
    vmax = max(v for _, v in frame.components.values())
    for number, scan in enumerate(scans):
        if scan.spectral != (0, 63, 0):
            raise _corrupt(path, f"scan {number} has spectral selection {scan.spectral} in a sequential JPEG")
        missing = [
            (kind, ident)
            for _, dc, ac in scan.components
            for kind, ident in ((0, dc), (1, ac))
            if (kind, ident) not in scan.tables
        ]
        if missing:
            raise _corrupt(path, f"scan {number} uses undefined Huffman table(s) {missing}")
        used = sorted({(kind, ident) for _, dc, ac in scan.components for kind, ident in ((0, dc), (1, ac))})
        try:
            luts = np.stack([_lookup_table(scan.tables[key], key[0] == 0) for key in used])
        except ValueError as exc:
            raise _corrupt(path, str(exc)) from None
        index = {key: i for i, key in enumerate(used)}
        if len(scan.components) == 1:  # non-interleaved: one block per MCU, the component's own block grid
            ident, dc, ac = scan.components[0]
            h, v = frame.components[ident]
            cols = _ceil_div(_ceil_div(frame.width * h, hmax), 8)
            rows = _ceil_div(_ceil_div(frame.height * v, vmax), 8)
            n_mcus, blocks = cols * rows, [(index[(0, dc)], index[(1, ac)])]
        else:
            n_mcus = _ceil_div(frame.width, 8 * hmax) * _ceil_div(frame.height, 8 * vmax)
            blocks = [
                (index[(0, dc)], index[(1, ac)])
                for ident, dc, ac in scan.components
                for _ in range(frame.components[ident][0] * frame.components[ident][1])
            ]
        status, where = _walk_scan(data, scan.start, scan.end, n_mcus, np.asarray(blocks, np.int64), scan.restart, luts)
        if status != OK:
            raise _corrupt(path, _describe(status, where, number, n_mcus))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _describe(status: int, where: int, scan: int, n_mcus: int) -> str:
    if status == EXTRANEOUS:
        return f"corrupt JPEG data: {where} extraneous byte(s) after the last block of scan {scan}"
    if status == PREMATURE_END:
        return f"corrupt JPEG data: scan {scan} ends after {where} of its {n_mcus} MCUs (premature end of data)"
    if status == BAD_RESTART:
        return f"corrupt JPEG data: restart marker missing or out of sequence after MCU {where} of scan {scan}"
    if status == RUN_PAST_BLOCK:
        return f"corrupt JPEG data: a coefficient run past the end of a block in MCU {where} of scan {scan}"
    return f"corrupt JPEG data: bad Huffman code in MCU {where} of scan {scan}"


def _walk_scan(data, start, end, n_mcus, blocks, restart, luts) -> tuple[int, int]:
    """(status, MCU index or byte count) of decoding every Huffman code of one sequential scan; compiled by
    numba on first use (cached), since a slide's scan holds hundreds of millions of bits."""
    from shared.ingest import _jpeg_walk

    return _jpeg_walk.walk_scan(data, start, end, n_mcus, blocks, restart, luts)

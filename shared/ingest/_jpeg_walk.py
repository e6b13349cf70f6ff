"""The compiled inner loop of shared/ingest/jpeg.py: decode every Huffman code of one sequential JPEG scan.

Kept in its own module so that importing shared.ingest does not import numba; numba caches the compiled code.
Statuses (shared.ingest.jpeg): 0 ok, 1 bad Huffman code, 2 premature end of data, 3 extraneous bytes,
4 restart marker missing or out of sequence, 5 a coefficient run past the end of a block.
"""

from __future__ import annotations

import numba


@numba.njit(cache=True, nogil=True, inline="always")
def _refill(data, pos, end, acc, nbits, hit):
    """Append entropy-coded bytes to the bit accumulator (at most 56 bits held) until a marker or ``end``;
    ``hit`` says the data of this restart interval (or scan) ran out."""
    while nbits <= 48 and not hit:
        if pos >= end:
            hit = True
            break
        byte = data[pos]
        if byte == 0xFF:
            if data[pos + 1] != 0:  # inside a scan only a restart marker follows an unstuffed 0xFF
                hit = True
                break
            pos += 2
        else:
            pos += 1
        acc = ((acc & ((1 << nbits) - 1)) << 8) | byte  # bits above nbits are consumed ones
        nbits += 8
    return pos, acc, nbits, hit


@numba.njit(cache=True, nogil=True)
def walk_scan(data, start, end, n_mcus, blocks, restart, luts):
    """(status, MCU index where it failed, or the count of extraneous bytes) for the scan in data[start:end].

    ``blocks``: (DC, AC) lookup-table rows of each block of an MCU; ``luts[t, next 16 bits]`` is
    ``code length << 8 | symbol``, 0 where no code of table t starts with those bits."""
    pos, acc, nbits, hit = start, 0, 0, False
    expected_rst = 0
    for mcu in range(n_mcus):
        if restart > 0 and mcu > 0 and mcu % restart == 0:
            # the rest of the byte is padding; the next two bytes must be the expected restart marker
            if nbits >= 8 or pos + 1 >= len(data) or data[pos] != 0xFF or data[pos + 1] != 0xD0 + expected_rst:
                return 4, mcu
            pos, acc, nbits, hit = pos + 2, 0, 0, False
            expected_rst = (expected_rst + 1) % 8
        for b in range(blocks.shape[0]):
            k = 0  # 0: the DC code; 1..63: AC coefficients
            while k < 64:
                if nbits < 32:
                    pos, acc, nbits, hit = _refill(data, pos, end, acc, nbits, hit)
                peek = (acc >> (nbits - 16)) if nbits >= 16 else (acc << (16 - nbits))
                entry = luts[blocks[b, 0] if k == 0 else blocks[b, 1], peek & 0xFFFF]
                length = entry >> 8
                if entry == 0 or length > nbits:
                    return (1 if entry == 0 and nbits >= 16 else 2), mcu
                nbits -= length
                symbol = entry & 0xFF
                if k == 0:
                    size = symbol
                    k = 1
                else:
                    run, size = symbol >> 4, symbol & 15
                    if size == 0:
                        if run != 15:
                            break  # end of block
                        k += 16
                        if k > 64:
                            return 5, mcu
                        continue
                    k += run
                    if k > 63:
                        return 5, mcu
                    k += 1
                if size > nbits:
                    return 2, mcu
                nbits -= size
    unused = nbits // 8 + (end - pos)
    trailing_rst = restart > 0 and unused == 2 and data[pos] == 0xFF and 0xD0 <= data[pos + 1] <= 0xD7  # some do
    if unused and not trailing_rst:
        return 3, unused
    return 0, n_mcus

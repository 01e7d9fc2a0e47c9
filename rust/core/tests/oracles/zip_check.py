"""Checks a zip that fastckpt wrote against Python's `zipfile`, the oracle.

Usage: python zip_check.py SPEC.json

SPEC is a JSON object:
  zip        path of the zip
  testzip    whether to run `ZipFile.testzip()` (reads every byte and checks every CRC)
  date_time  the [Y, M, D, h, m, s] every member must carry (optional)
  members    in order, each {name, size, crc (optional), align (optional),
             expected (optional: path of a file holding the member's exact bytes),
             pieces (optional: [[offset in member, path of the bytes there], ...])}

Raises (exit status 1) on the first mismatch; prints a JSON report of what zipfile saw.
"""

import json
import struct
import sys
import zipfile


def local_data_offset(raw, info):
    raw.seek(info.header_offset)
    head = raw.read(30)
    sig, _, flags, method, _, _, crc, _, _, name_len, extra_len = struct.unpack(
        "<4sHHHHHIIIHH", head
    )
    assert sig == b"PK\x03\x04", f"{info.filename}: no local header signature"
    assert method == 0 and crc == info.CRC, f"{info.filename}: local header disagrees"
    assert flags == info.flag_bits, f"{info.filename}: local flags {flags} != {info.flag_bits}"
    return info.header_offset + 30 + name_len + extra_len


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    report = []
    with zipfile.ZipFile(spec["zip"]) as zf, open(spec["zip"], "rb") as raw:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        want = [m["name"] for m in spec["members"]]
        assert names == want, f"members {names!r} != {want!r}"
        for info, m in zip(infos, spec["members"]):
            n = info.filename
            assert info.compress_type == zipfile.ZIP_STORED, f"{n}: not stored"
            assert info.file_size == info.compress_size == m["size"], (
                f"{n}: sizes {info.file_size}/{info.compress_size}, want {m['size']}"
            )
            if "crc" in m:
                assert info.CRC == m["crc"], f"{n}: CRC {info.CRC:#x} != {m['crc']:#x}"
            if "date_time" in spec:
                assert list(info.date_time) == spec["date_time"], f"{n}: {info.date_time}"
            assert bool(info.flag_bits & 0x800) == (not n.isascii()), f"{n}: UTF-8 flag"
            assert info.flag_bits & 0x8 == 0, f"{n}: data descriptor"
            data_offset = local_data_offset(raw, info)
            if m.get("align"):
                assert data_offset % m["align"] == 0, f"{n}: data at {data_offset}"
            if m.get("expected"):
                with open(m["expected"], "rb") as f:
                    expected = f.read()
                # ZipExtFile checks the CRC when it reaches the end.
                got = zf.read(n)
                assert got == expected, f"{n}: bytes differ"
            for offset, path in m.get("pieces", []):
                with open(path, "rb") as f:
                    expected = f.read()
                raw.seek(data_offset + offset)
                assert raw.read(len(expected)) == expected, f"{n}: bytes at {offset} differ"
            report.append(
                {
                    "name": n,
                    "size": info.file_size,
                    "crc": info.CRC,
                    "header_offset": info.header_offset,
                    "data_offset": data_offset,
                    "extract_version": info.extract_version,
                }
            )
        if spec.get("testzip", True):
            bad = zf.testzip()
            assert bad is None, f"testzip: first bad member {bad!r}"
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""Damage a checkpoint file on disk, for the tests of what loading reports."""
import zipfile
from pathlib import Path


def flip_a_data_bit(path: Path) -> None:
    """One bit of a tensor record's bytes flipped: the archive still reads, its CRC-32 does not match."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 64)
    data = bytearray(Path(path).read_bytes())
    # local header: 30 bytes + name + extra field, then the record's bytes
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_len + extra_len + 17] ^= 0x04
    Path(path).write_bytes(bytes(data))

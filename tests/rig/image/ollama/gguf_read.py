# stand-in (gpucluster test rig): reads a GGUF file's header as llama.cpp's gguf reader does (v2/v3), no gpucluster code.
import struct

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def header(path, limit=64 << 20):
    """{key: value} of the metadata (arrays as their length), or ValueError naming what is wrong."""
    with open(path, "rb") as f:
        data = f.read(limit)
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(data):
            raise ValueError("truncated GGUF header")
        pos += n
        return data[pos - n:pos]

    def num(fmt):
        return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

    def string():
        return take(num("<Q")).decode("utf-8", "replace")

    if take(4) != b"GGUF":
        raise ValueError("invalid file magic")
    version = num("<I")
    if version not in (2, 3):
        raise ValueError("unsupported GGUF version %d" % version)
    n_tensors, n_kv = num("<Q"), num("<Q")
    kv = {"__version": version, "__tensors": n_tensors}
    for _ in range(n_kv):
        key, t = string(), num("<I")
        if t in SCALARS:
            kv[key] = num(SCALARS[t])
        elif t == 8:
            kv[key] = string()
        elif t == 9:
            at, n = num("<I"), num("<Q")
            for _ in range(n):
                string() if at == 8 else num(SCALARS[at])
            kv[key] = n
        else:
            raise ValueError("unknown metadata type %d" % t)
    if not isinstance(kv.get("general.architecture"), str):
        raise ValueError("no general.architecture")
    return kv

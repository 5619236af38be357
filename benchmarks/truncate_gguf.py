"""Write a Llama-family GGUF's first N layers (embedding, final norm and head kept, tensors copied byte for
byte) as a smaller GGUF: a real model's weights and tokenizer in few enough megabytes to travel to a lent
GPU machine (whose transfers are capped at 64 MiB). Usage: truncate_gguf.py IN.gguf OUT.gguf --layers 8"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def truncate(src: Path, dst: Path, layers: int) -> None:
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = layers if name == f"{arch}.block_count" else field.contents()
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(name, value, field.types[0], sub)
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= layers:
            continue
        writer.add_tensor(t.name, t.data, raw_shape=list(t.data.shape), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--layers", type=int, required=True)
    args = ap.parse_args(argv)
    truncate(args.src, args.dst, args.layers)
    print(f"{args.dst}: {args.dst.stat().st_size / 1e6:.1f} MB, first {args.layers} layers of {args.src.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

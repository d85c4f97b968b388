"""Make one model file from stage 1 of one `.kseg` and stage 2 of another.

    python scripts/combine_stages.py --stage1 RUN/stage1/best.kseg --stage2 OTHER.kseg --out M.kseg

Used when a fine-tuning round improves stage 1 (where a false kidney piece starts: stage 2 only
looks inside stage 1's mask) before its stage 2 is done or better. Both files must share the
preprocessing, label map and mask settings, or the networks would read another image than the
one they were trained on. The new file's provenance names both sources, with their weight
SHA-256s and their own provenance, so `kits-seg info` tells where each stage came from.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", type=Path, required=True, help="model file whose stage 1 is taken")
    parser.add_argument("--stage2", type=Path, required=True, help="model file whose stage 2 is taken")
    parser.add_argument("--out", type=Path, required=True, help="new model file (not overwritten)")
    args = parser.parse_args()

    from dataclasses import replace

    from kitseg.checkpoint import load_bundle, read_metadata, save_bundle

    first, second = load_bundle(args.stage1), load_bundle(args.stage2)
    for path, name, stage in ((args.stage1, "stage 1", first.stage1), (args.stage2, "stage 2", second.stage2)):
        if stage is None:
            raise SystemExit(f"{path}: has no {name}")
    for field in ("preprocessing", "label_map", "mask"):
        if getattr(first, field) != getattr(second, field):
            raise SystemExit(f"{args.stage1} and {args.stage2} differ in {field}: their stages cannot be combined")

    def source(path: Path, key: str) -> dict:
        meta = read_metadata(path)
        return {"file": path.name, "weights_sha256": meta["stages"][key]["weights_sha256"],
                "provenance": meta["provenance"]}

    provenance = {
        "command": "python scripts/combine_stages.py " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "combined_from": {"stage1": source(args.stage1, "1"), "stage2": source(args.stage2, "2")},
    }
    combined = replace(second, stage1=first.stage1, provenance=provenance)
    print(f"wrote {save_bundle(combined, args.out, overwrite=False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

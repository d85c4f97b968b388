"""Which of stage 2's deep-supervision heads to trust: Dice of each head alone and of all together.

    python scripts/stage2_head_study.py --run work_data/run_amp --data work_data/phantoms_v3 [--weights M.kseg]

A UNet++ trained with deep supervision has one head per sub-network (``X^{0,1}`` shallow ..
``X^{0,depth}`` deep); inference averages their logits by default, ``--stage2-level K`` keeps
only head K (pruned inference). This scores each choice for the model's stage 2 (default: the
shipped model) on the run's validation cases, on the stage grid, stage 2 reading the model's own
stage-1 y1 (as ``kits-seg train`` validates), KiTS19 definitions, tumor Dice also by tumor size.
A shallow head sees a few pixels of context, a small tumor may need more than that: if one head
alone beats the average, the average is the wrong ensemble. The run's case cache is read, not rebuilt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fit_gap_study import BAND_HEADER, band_cells, load_run  # the same run reading and size bands


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a kits-seg train --out folder (its split and cache)")
    parser.add_argument("--data", type=Path, required=True, help="the KiTS19-layout folder the run trained on")
    parser.add_argument("--cache", type=Path, default=None,
                        help="the run's prepared-case cache, if it trained with --cache (default RUN/cache)")
    parser.add_argument("--weights", type=Path, default=None, help="model scored (default: the shipped one)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from kitseg.checkpoint import load_bundle
    from kitseg.pipeline import Segmenter
    from kitseg.training.loop import stage1_y1, stage2_dice
    from kitseg.weights import default_weights_path

    config, split, cases = load_run(args.run, args.data, ("validation",), cache=args.cache)
    chosen = [cases[n] for n in split["validation"]]
    weights = args.weights or default_weights_path()
    segmenter = Segmenter(load_bundle(weights), device=args.device, batch_size=16)
    y1 = stage1_y1(segmenter, chosen, config)
    depth = config.stage2_kwargs["depth"]

    print(f"stage 2 of {weights}: {len(chosen)} validation cases of {args.run}, stage grid")
    print(f"{'stage 2 heads':<14} {'kidney':>7} {'tumor':>7}   " + BAND_HEADER + "   seconds")
    for level in (None, *range(1, depth + 1)):
        segmenter = Segmenter(load_bundle(weights), device=args.device, batch_size=16, stage2_level=level)
        start = time.perf_counter()
        scores = stage2_dice(segmenter, chosen, y1, config)
        seconds = time.perf_counter() - start
        kidney, tumor = (float(np.mean(column)) for column in zip(*scores))
        title = "all (mean)" if level is None else f"head {level} only"
        print(f"{title:<14} {kidney:>7.4f} {tumor:>7.4f}   " + band_cells(chosen, [t for _, t in scores])
              + f"   {seconds:7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

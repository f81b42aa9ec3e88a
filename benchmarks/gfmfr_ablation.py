"""GFMFR ablations on ML-100K with the shared content, for one base model, over seeds.

Variants: G in {1, 3, 5, 8}; text only, image only, both; each fusion expert; without
distillation; spectral vs k-means; fusion warm-started vs trained from scratch each round;
the docs/method.md mean-head teacher vs the members' mean prediction; without the item-ID view, or
with one item-ID view per group; the KL term training every parameter vs only the private or only the shared ones;
the KL term on every training pair vs on the sampled negatives only; the KL term and the base loss
averaged over the nominal batch size vs over the pairs a batch holds. Finished runs are reused.

    python benchmarks/gfmfr_ablation.py --model fcf --seeds 0 1 2 --out runs/ablation.jsonl \
        [--set federation.rounds=40] [--variants base default G=3 text-only]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ml100k_table import common_args, run_grid, summarize  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "base": ["plugin=none"],
    "default": [],
    "G=1": ["gfmfr.groups=1"],
    "G=3": ["gfmfr.groups=3"],
    "G=8": ["gfmfr.groups=8"],
    "text-only": ["gfmfr.modalities=text"],
    "image-only": ["gfmfr.modalities=image"],
    "fusion=sum": ["gfmfr.fusion=sum"],
    "fusion=gate": ["gfmfr.fusion=gate"],
    "fusion=attention": ["gfmfr.fusion=attention"],
    "fusion=mixture": ["gfmfr.fusion=mixture"],
    "kmeans": ["gfmfr.grouping=kmeans"],
    "mean-head-teacher": ["gfmfr.teacher=mean_head"],
    "no-item-view": ["gfmfr.item_view=false"],
    "server-steps=50": ["gfmfr.server_steps=50"],
    "distill-all": ["gfmfr.distill_on=all"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fcf")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    common_args(parser, "runs/ablation.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    jobs = [
        (
            {"model": args.model, "variant": variant, "seed": seed, "set": sorted(args.set)},
            [f"model.name={args.model}", "plugin=gfmfr", *args.set, *VARIANTS[variant]],
        )
        for seed in args.seeds
        for variant in args.variants
    ]
    rows = run_grid(jobs, args.content, Path(args.out))
    sys.stdout.write(summarize(rows, ["model", "variant"], ("variant", "base")) + "\n")


if __name__ == "__main__":
    main()

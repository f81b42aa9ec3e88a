"""Server-side encoding time of the item content: cold (empty cache) and cached.

python benchmarks/encode_speed.py --content ../shared/datasets/ml-100k-content
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--content", default="../shared/datasets/ml-100k-content")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["GFMFR_CACHE"] = cache
        from gfmfr.config import DataConfig
        from gfmfr.data.dataset import load_dataset
        from gfmfr.data.encoders import dataset_features

        dataset = load_dataset(DataConfig(content=args.content))  # downloads ML-100K into the temp cache
        for label in ("cold", "cached"):
            t0 = time.perf_counter()
            result = dataset_features(dataset)
            report = {
                m: {k: v for k, v in r.items() if k in ("encoded", "reused", "seconds")}
                for m, r in result.report.items()
            }
            sys.stdout.write(f"{label}: {time.perf_counter() - t0:.1f} s total {json.dumps(report)}\n")


if __name__ == "__main__":
    main()

"""Training-step benchmark: this pipeline vs a full-logits baseline (see docs/benchmarks.md).

    python scripts/bench_train.py [--layers 2] [--steps 1] [--json out.json]

Same as ``phi4mm-lora bench train``; each variant runs in its own subprocess.
"""

from __future__ import annotations

import argparse
import sys

from phi4mm_lora.train.bench import add_args, run_cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    sys.exit(run_cli(parser.parse_args()))

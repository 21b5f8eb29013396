"""Write a tiny random multimodal Llama 4 checkpoint: Llama4ForConditionalGeneration with 4 text
layers (Scout's layout: MoE, chunked attention, QK-norm), a 2-layer vision tower, 56-pixel tiles,
Llama 4's chat template and a 320-token tokenizer that has the image tokens. It is what the tests
use (tests/tiny_models.py); its weights are random, so its answers are noise: it is for trying image
requests end to end without the 200 GB Scout checkpoint. Takes a few seconds on a CPU.

    python scripts/make_tiny_multimodal.py OUT_DIR [--variant scout|maverick] [--seed 0]
    herd serve OUT_DIR
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # the repository root

from tests.tiny_models import make_tiny_multimodal_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--variant", choices=["scout", "maverick"], default="scout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_multimodal_checkpoint(args.out_dir, args.variant, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Two engines in one process, same shapes, different weights, both with CPU `-O 3` (inductor,
frozen weights): each must give its own eager greedy outputs, first and second time round.

Compiled decode skips dynamo's full guard check after a size's first call (only the guards that
tell cached graphs apart run; docs/fast_path.md, "Compiled decode"), and dynamo's cache is shared
by every engine of a process. This checks that an engine never runs another one's graph. It
compiles four graphs (about two minutes on 2 cores), so it is not part of the test suite.

    python scripts/check_compiled_engines.py      # exit 0 when every output matches
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    import torch

    from herd import LLM, SamplingParams
    from tests.tiny_models import make_tiny_checkpoint

    torch.set_num_threads(2)
    root = tempfile.mkdtemp()
    paths = [make_tiny_checkpoint(os.path.join(root, name), "scout", seed=seed) for name, seed in (("a", 0), ("b", 1))]
    kw = dict(dtype="float32", block_size=4, num_kv_blocks=128, max_model_len=160)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = ["Hello there", "The herd grazes"]

    def tokens(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]

    eager = [tokens(LLM(p, enforce_eager=True, **kw)) for p in paths]
    if eager[0] == eager[1]:
        print("the two checkpoints generate the same tokens: the check would prove nothing")
        return 2
    compiled = [LLM(p, compilation_config={"level": 3, "cudagraph_capture_sizes": [1, 2]}, **kw) for p in paths]
    ok = True
    for round_ in (1, 2):
        for name, llm, ref in zip("ab", compiled, eager):
            same = tokens(llm) == ref
            ok &= same
            print(f"round {round_}, engine {name}: {'same as eager' if same else 'DIFFERS from eager'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

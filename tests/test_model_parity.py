"""herd's Llama 4 text model vs transformers (fp32): full prefill and paged incremental decode."""
import pytest
import torch

from herd.model.loader import load_model
from herd.attention.metadata import CommonAttentionMetadata, group_chunks, make_metadata
from herd.attention.selector import get_attn_backend
from tests.tiny_models import load_hf

VARIANTS = ["scout_dir", "maverick_dir", "scout_mm_dir"]


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=ids[None]).logits[0].float()


def run_paged(model, ids, steps, block_size=4, free_local=True, backend="reference"):
    """Feed `ids` in pieces of the given sizes through the paged path, one sequence.
    Local-group blocks entirely left of the current chunk are freed (-1) as the engine does."""
    cfg = model.config
    n_layers, nkv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    n_blocks = (len(ids) + block_size - 1) // block_size
    caches = [(torch.zeros(2 * n_blocks, block_size, nkv, d), torch.zeros(2 * n_blocks, block_size, nkv, d))
              for _ in range(n_layers)]
    # full group uses physical blocks [0, n), local group [n, 2n): distinct slots per group
    full_table = torch.arange(n_blocks)[None].clone()
    local_table = (torch.arange(n_blocks) + n_blocks)[None].clone()
    outs, done = [], 0
    chunk = cfg.attention_chunk_size
    for size in steps:
        pos = torch.arange(done, done + size)
        if free_local:
            first_needed = (done // chunk) * chunk // block_size
            local_table[0, :first_needed] = -1
        slots_f = full_table[0, pos // block_size] * block_size + pos % block_size
        slots_l = local_table[0, pos // block_size] * block_size + pos % block_size
        common = CommonAttentionMetadata.from_host([0, size], [done + size],
                                                   {"full": full_table, "local": local_table},
                                                   {"full": slots_f, "local": slots_l}, block_size)
        meta = make_metadata(get_attn_backend(backend, "cpu"), common, group_chunks(model), caches)
        with torch.no_grad():
            h = model(ids[done:done + size], pos, meta)
            outs.append(model.compute_logits(h))
        done += size
    return torch.cat(outs)


@pytest.mark.parametrize("fixture", VARIANTS)
def test_prefill_logits_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    hf = load_hf(path)
    model = load_model(path, dtype=torch.float32)
    for n in (21, 37):
        ids = torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            ours = model.compute_logits(model(ids, torch.arange(n)))
        ref = hf_logits(hf, ids)
        assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("fixture", VARIANTS)
def test_paged_decode_matches_transformers(fixture, backend, request):
    path = request.getfixturevalue(fixture)
    hf = load_hf(path)
    model = load_model(path, dtype=torch.float32)
    n = 33
    ids = torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(7))
    ref = hf_logits(hf, ids)
    # prefill 5, a chunked-prefill piece of 6 that crosses a chunk boundary, then one token at a time
    steps = [5, 6] + [1] * (n - 11)
    ours = run_paged(model, ids, steps, backend=backend)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_temperature_tuning_and_chunking_matter(scout_dir):
    """Guard against a test that would pass with the features switched off."""
    model = load_model(scout_dir, dtype=torch.float32)
    ids = torch.randint(3, 320, (30,), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(30)
    with torch.no_grad():
        base = model.compute_logits(model(ids, pos))
        attn = model.model.layers[3].self_attn
        attn.temperature_tuning = False
        no_temp = model.compute_logits(model(ids, pos))
        attn.temperature_tuning = True
        for layer in model.model.layers:
            layer.self_attn.attn.chunk = None
        no_chunk = model.compute_logits(model(ids, pos))
    assert (base - no_temp).abs().max() > 1e-3
    assert (base[:8] - no_chunk[:8]).abs().max() < 1e-5  # first chunk identical
    assert (base[8:] - no_chunk[8:]).abs().max() > 1e-3


def test_freed_block_is_detected(scout_dir):
    model = load_model(scout_dir, dtype=torch.float32)
    ids = torch.randint(3, 320, (12,))
    with pytest.raises(RuntimeError, match="freed"):
        # free local blocks but then attend from chunk 0 again by feeding the whole thing at once
        cfg = model.config
        caches = [(torch.zeros(8, 4, 2, 16), torch.zeros(8, 4, 2, 16)) for _ in range(cfg.num_hidden_layers)]
        table = torch.tensor([[-1, 1, 2]])
        pos = torch.arange(12)
        slots = torch.arange(12)
        common = CommonAttentionMetadata.from_host([0, 12], [12], {"full": table.abs(), "local": table},
                                                   {"full": slots, "local": slots}, 4)
        meta = make_metadata(get_attn_backend("reference", "cpu"), common, group_chunks(model), caches)
        model(ids, pos, meta)

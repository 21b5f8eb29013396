import pytest
import torch

from herd.quant.formats import (E4M3_GAUDI2, E4M3FN, E5M2, ScaleDevice, cast_to_fp8, dequantize,
                                dynamic_token_scales, fp8_format, fullscale, hw_scales, hw_traits,
                                opt_weight_candidates, pow2_ceil, qdq, quantize)


def test_format_ranges_and_bias():
    assert E4M3FN.max == torch.finfo(torch.float8_e4m3fn).max == 448.0
    assert E4M3_GAUDI2.max == 240.0
    assert E5M2.max == torch.finfo(torch.float8_e5m2).max == 57344.0
    assert (E4M3FN.default_bias, E5M2.default_bias) == (7, 15)


def test_fullscale_with_exponent_bias():
    assert fullscale(E4M3FN) == 448.0
    assert fullscale(E4M3FN, 3) == 448.0 * 16      # bias 3 = 4 steps above the default 7
    assert fullscale(E4M3_GAUDI2, 11) == 240.0 / 16
    assert fullscale(E5M2, 16) == 57344.0 / 2


def test_fp8_format_per_device():
    assert fp8_format("GAUDI2") is E4M3_GAUDI2
    assert fp8_format("gaudi3") is E4M3FN
    assert fp8_format(ScaleDevice.CUDA) is E4M3FN
    assert fp8_format("g3", "e5m2") is E5M2
    with pytest.raises(ValueError, match="fp8_config"):
        fp8_format("g3", "E3M4")
    with pytest.raises(ValueError, match="GAUDI2, GAUDI3 or CUDA"):
        ScaleDevice.parse("tpu")


def test_hw_scale_sets():
    assert hw_scales("GAUDI2", E4M3_GAUDI2) == [16.0, 1.0, 1 / 16, 1 / 256]
    g3 = hw_scales("GAUDI3", E4M3FN)
    assert len(g3) == 63 and g3[0] == 2.0 ** 7 and g3[-1] == 2.0 ** -55
    assert all(a == 2 * b for a, b in zip(g3, g3[1:]))      # descending powers of two
    assert hw_scales("GAUDI2", E5M2) == [1.0]
    assert hw_scales("CUDA", E4M3FN) is None               # any float scale works
    assert opt_weight_candidates("CUDA", E4M3FN) == g3


def test_hw_traits():
    t2, t3 = hw_traits("GAUDI2", E4M3_GAUDI2), hw_traits("GAUDI3", E4M3FN)
    assert (t2.min_scale, t2.max_scale, t2.step) == (2.0 ** -8, 16.0, 4)
    assert (t3.min_scale, t3.max_scale, t3.step) == (2.0 ** -55, 128.0, 1)
    assert hw_traits("CUDA", E4M3FN) is None


def test_cast_saturates_instead_of_nan():
    x = torch.tensor([1000.0, -1000.0, 250.0, 239.0, 0.1])
    q = cast_to_fp8(x, E4M3FN).float()
    assert q[:2].tolist() == [448.0, -448.0]
    g2 = cast_to_fp8(x, E4M3_GAUDI2).float()
    assert g2[:3].tolist() == [240.0, -240.0, 240.0]        # 250 would round to 256 on E4M3FN
    assert g2.abs().max() <= 240.0
    assert torch.isfinite(cast_to_fp8(torch.tensor([1e9]), E5M2).float()).all()


def test_quantize_dequantize_round_trip_and_per_channel_scale():
    w = torch.tensor([[1.0, -2.0], [100.0, 50.0]])
    s = torch.tensor([[2.0 / 448], [100.0 / 448]])
    q = quantize(w, s, E4M3FN)
    assert q.dtype == torch.float8_e4m3fn
    back = dequantize(q, s)
    assert torch.allclose(back, w, rtol=1 / 16)
    assert back[0, 1].item() == -2.0 and back[1, 0].item() == 100.0   # the maxabs maps exactly to 448
    assert torch.equal(qdq(w, s, E4M3FN), back)


def test_pow2_ceil_is_exact_and_rounds_up():
    r = torch.tensor([0.25, 0.2500001, 3.0, 1e-40, 0.0, 1.0], dtype=torch.float64)
    assert pow2_ceil(r).tolist() == [0.25, 0.5, 4.0, 2.0 ** -132, 0.0, 1.0]


def test_dynamic_token_scales():
    x = torch.tensor([[1.0, -448.0], [0.0, 0.0], [3.0, 0.5]])
    s = dynamic_token_scales(x, E4M3FN, backoff=0.5)
    assert s.shape == (3, 1)
    # 448/(448*0.5) = 2 -> 2; 0 -> tiny_bf16 -> 2^-126; 3/224 -> 2^-6
    assert s.flatten().tolist() == [2.0, 2.0 ** -126, 2.0 ** -6]

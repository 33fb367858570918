"""Codecs: whole-vector, outlier split, mean-centered."""

import pytest
import torch

from tqpatch.codec import CenteredCodec, SplitCodec, TurboQuantCodec, make_codec
from tqpatch.config import split_bits


def offset_keys(seed=0, heads=3, tokens=200, d=64):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randn(heads, d, generator=gen) * 4  # large per-channel offsets, as RoPE keys have
    return torch.randn(2, heads, tokens, d, generator=gen) + offsets[None, :, None, :]


@pytest.mark.parametrize(
    "bits,step,expected",
    [(2.5, 1, (32, 3, 2)), (3.5, 1, (32, 4, 3)), (4, 1, (0, 4, 4)), (2.25, 1, (16, 3, 2)), (2.5, 2, (16, 4, 2)), (4.25, 2, (8, 6, 4))],
)
def test_split_bits(bits, step, expected):
    outliers, high, low = split_bits(bits, 64, step)
    assert (outliers, high, low) == expected
    assert (outliers * high + (64 - outliers) * low) / 64 == bits


def test_make_codec_picks_the_kind():
    assert isinstance(make_codec(64, 4, "mse", 0), TurboQuantCodec)
    assert isinstance(make_codec(64, 2.5, "mse", 0), SplitCodec)
    centered = make_codec(64, 3, "prod", 0, center=True)
    assert isinstance(centered, CenteredCodec) and centered.head_dim == 64 and centered.bits == 3


def test_split_codec_gives_outlier_channels_more_bits():
    x = torch.randn(1, 2, 100, 64)
    x[:, 0, :, 5] *= 20
    x[:, 1, :, 40] *= 20
    codec = SplitCodec(64, 2.5)
    out = codec.decode(codec.encode(x), torch.float32)
    assert 5 in codec.outlier_index[0].tolist() and 40 in codec.outlier_index[1].tolist()
    plain = TurboQuantCodec(64, 2)
    plain_out = plain.decode(plain.encode(x), torch.float32)
    assert (out - x).norm() < 0.7 * (plain_out - x).norm()
    assert codec.bits_per_coordinate == 2.5


def test_centering_cuts_the_error_of_offset_vectors_and_round_trips_shape():
    x = offset_keys()
    for bits in (2, 4):
        plain, centered = make_codec(64, bits, "mse", 0), make_codec(64, bits, "mse", 0, center=True)
        err_plain = (plain.decode(plain.encode(x), torch.float32) - x).norm()
        out = centered.decode(centered.encode(x), torch.bfloat16)
        assert out.shape == x.shape and out.dtype == torch.bfloat16
        assert (out.float() - x).norm() < 0.5 * err_plain


def test_centering_mean_is_fixed_after_the_first_chunk_and_skips_the_first_token():
    x = offset_keys()
    x[:, :, 0] += 1000.0  # an attention-sink-like first token must not move the mean
    codec = make_codec(64, 4, "mse", 0, center=True)
    codec.encode(x[:, :, :50])
    expected = x[:, :, 1:50].mean(dim=(0, 2))
    assert torch.allclose(codec.mean.float(), expected, atol=0.01, rtol=0.01)
    first = codec.mean.clone()
    codec.encode(x[:, :, 50:] + 5.0)
    assert torch.equal(codec.mean, first)
    assert codec.extra_nbytes == 3 * 64 * 2


def test_rotation_search_keeps_the_candidate_with_the_smallest_error():
    from tqpatch.codec import RotationSearchCodec

    x = offset_keys(seed=3)
    codec = RotationSearchCodec(64, 2, "mse", seed=5, candidates=6)
    out = codec.decode(codec.encode(x), torch.float32)
    errors = []
    for i in range(6):
        single = TurboQuantCodec(64, 2, "mse", seed=5 + i)
        errors.append(((single.decode(single.encode(x), torch.float32) - x) ** 2).sum().item())
    assert codec.chosen == min(range(6), key=errors.__getitem__)
    assert ((out - x) ** 2).sum().item() == pytest.approx(min(errors), rel=1e-6)
    assert codec.quantizer.seed == 5 + codec.chosen and codec.candidates == []
    later = offset_keys(seed=4)
    assert torch.equal(codec.encode(later)["codes"], TurboQuantCodec(64, 2, "mse", 5 + codec.chosen).encode(later)["codes"])


def test_rotation_search_with_one_candidate_is_plain_turboquant():
    assert type(make_codec(64, 4, "mse", 0, rotation_candidates=1)) is TurboQuantCodec
    assert make_codec(64, 2.5, "mse", 0, rotation_candidates=8).__class__ is SplitCodec  # split codecs do not search

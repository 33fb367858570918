"""The kernels' view of split codecs (tqpatch.kernels.groups), checked on the CPU: the per-head query matrix Q and
value matrix U must turn the kernel's per-group arithmetic (scores n_g ⟨(q Q)[group columns], c_g⟩, value sums
Σ p n_g c_g mapped back through U) into attention over the codec's own decoded vectors."""

from __future__ import annotations

import pytest
import torch

from tqpatch.codec import SplitCodec, TurboQuantCodec
from tqpatch.kernels import supports
from tqpatch.kernels.groups import code_groups, kernel_columns, layout, padded_width, planes


def _kernel_vectors(codec, parts, lay) -> torch.Tensor:
    """What the kernel works with: each group's centroids c_g scaled by its norm n_g, in the kernel's columns
    [B, H, T, Σ W_g] (zeros in padding columns)."""
    groups = code_groups(codec)
    lead = parts[groups[0].codes].shape[:3]
    out = torch.zeros(*lead, sum(lay.widths))
    offset = 0
    for g, width, p in zip(groups, lay.widths, lay.planes):
        norms = parts[g.norms].float() if g.norm_codes is None else g.norm_codes.decode(parts[g.norms])
        coords = g.mse.lookup(parts[g.codes]) * norms[..., None]  # [B, H, T, w] rotated, natural order
        out[..., offset + kernel_columns(g.head_dim, width, p)] = coords
        offset += width
    return out


@pytest.mark.parametrize("d,groups,norm_bits,min_plane", [
    (128, (64, 4, 3), 8, 32), (64, (24, 4, 2), 16, 16), (64, (32, 3, 0), 8, 32), (64, (26, 3, 1), 16, 16), (32, (16, 2, 2), 16, 16),
])
def test_query_and_value_matrices_reproduce_attention_over_decoded_vectors(d, groups, norm_bits, min_plane):
    gen = torch.Generator().manual_seed(d + groups[0])
    b, h, t, g = 2, 3, 19, 4
    x = torch.randn(b, h, t, d, generator=gen) * (1 + 3 * torch.rand(d, generator=gen))
    codec = SplitCodec(d, 0.0, seed=4, norm_bits=norm_bits, groups=groups)
    parts = codec.encode(x)  # calibrates the channel groups on x
    assert supports(codec)
    lay = layout(codec, code_groups(codec), d, torch.device("cpu"), min_plane)
    assert lay.query.shape == (h, d, sum(lay.widths)) and lay.unrotate.shape == (h, padded_width(sum(lay.widths)), d)
    z = _kernel_vectors(codec, parts, lay)  # [B, H, T, QW]
    decoded = codec.decode(parts, torch.float32)  # [B, H, T, d]
    q = torch.randn(b, h, g, d, generator=gen)
    scores_kernel = torch.einsum("bhgw,bhtw->bhgt", torch.matmul(q, lay.query), z)
    scores_codec = torch.einsum("bhgd,bhtd->bhgt", q, decoded)
    assert torch.allclose(scores_kernel, scores_codec, atol=1e-4 * scores_codec.abs().max())
    p = torch.softmax(scores_codec, dim=-1)
    values_kernel = torch.matmul(torch.einsum("bhgt,bhtw->bhgw", p, z), lay.unrotate[:, : z.shape[-1]])
    values_codec = torch.einsum("bhgt,bhtd->bhgd", p, decoded)
    assert torch.allclose(values_kernel, values_codec, atol=1e-4 * values_codec.abs().max())


def test_plane_rule_and_padding():
    assert planes(64, 4) == 2 and planes(64, 2) == 4 and planes(64, 2, min_width=32) == 1 and planes(64, 3) == 1
    assert planes(128, 2, min_width=32) == 4 and planes(16, 4) == 1  # a plane needs >= 16 channels
    assert [padded_width(w) for w in (8, 16, 24, 40, 64, 100)] == [16, 16, 32, 64, 64, 128]
    assert kernel_columns(6, 8, 2).tolist() == [0, 4, 1, 5, 2, 6]


def test_whole_vector_codecs_share_one_matrix_and_unsupported_codecs_have_none():
    codec = TurboQuantCodec(64, 4, "mse", seed=0)
    lay = layout(codec, code_groups(codec), 64, torch.device("cpu"))
    assert lay.query.shape == (1, 64, 64) and torch.allclose(lay.query[0] @ lay.unrotate[0], torch.eye(64), atol=1e-5)
    five = TurboQuantCodec(64, 5, "mse", seed=0)  # 5-8-bit groups: the split kernel reads 2^b-entry tables
    lay5 = layout(five, code_groups(five), 64, torch.device("cpu"))
    assert lay5.centroids.shape == (1, 32) and torch.equal(lay5.centroids[0], five.quantizer.centroids("cpu").half())
    assert code_groups(SplitCodec(64, 3.5, seed=0)) is None  # not calibrated yet


@pytest.mark.parametrize("d", [64, 128])
def test_warp_kernel_channel_orders_turn_its_tiles_into_attention_over_the_stored_vectors(d):
    """The Gluon warp kernel decodes a [16 tokens, d/2 bytes] tile by joining both nibbles' centroids and reshaping
    (keys: (t, 4, d/8, 2) -> (j, m, e, t); values: (t, 8, d/8) -> (t, c, r)). With the query's channels ordered by
    key_channels and the value columns mapped back by value_columns, that is attention over the natural decode."""
    from tqpatch.kernels.groups import key_channels, pair_table, value_columns

    gen = torch.Generator().manual_seed(d)
    centroids = torch.randn(16, generator=gen)
    codes = torch.randint(0, 256, (16, d // 2), generator=gen)  # packed 4-bit codes, natural order
    lo, hi = centroids[codes & 15], centroids[codes >> 4]
    stored = torch.stack([lo, hi], -1).reshape(16, d)  # channel 2·byte + nibble
    keys = torch.stack([lo, hi], -1).reshape(16, 4, d // 8, 2).permute(2, 1, 3, 0).reshape(d, 16)  # the kernel's key operand
    values = torch.stack([lo, hi], -1).reshape(16, 8, d // 8).permute(0, 2, 1).reshape(16, d)  # its value operand
    q = torch.randn(3, d, generator=gen)
    assert torch.allclose(q[:, key_channels(d)] @ keys, q @ stored.T, atol=1e-5)
    p = torch.randn(3, 16, generator=gen)
    unrotate = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]  # rows: rotated coordinates
    assert torch.allclose((p @ values) @ unrotate[value_columns(d)], (p @ stored) @ unrotate, atol=1e-4)
    assert sorted(key_channels(d).tolist()) == list(range(d)) and sorted(value_columns(d).tolist()) == list(range(d))
    # the pair table: byte v -> (c[v & 15], c[v >> 4]) as two float16 halves of one int32
    table = pair_table(centroids)
    halves = torch.stack([table & 0xFFFF, table >> 16], -1).to(torch.int16).view(torch.float16)
    v = torch.arange(256)
    assert torch.equal(halves[:, 0], centroids.half()[v & 15]) and torch.equal(halves[:, 1], centroids.half()[v >> 4])


def _fp16_bits(x: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFF for v in x.half().view(torch.int16).tolist()]


@pytest.mark.parametrize("symmetric", [False, True])
def test_lut_kernel_ptx_decodes_every_byte_from_the_register_table(symmetric):
    """The exact PTX text `_tq_decode_lut_kernel` runs (interpreted on CPU by ptx.run_ptx): keys turn every byte
    of a code word into its fp16 centroid pair; values pair two tokens' codes per channel. Distinct entries, so a
    wrong select, sign or byte order shows: an asymmetric codebook (as the fitted ones are) for the general PTX, a
    symmetric one (c[15 - i] = -c[i], the Lloyd-Max ones) for the shorter PTX."""
    import random

    from tqpatch.kernels import groups
    from tqpatch.kernels.groups import is_symmetric, lut_table
    from tqpatch.kernels.ptx import run_ptx

    gen = torch.Generator().manual_seed(0)
    centroids = torch.randn(16, generator=gen).sort().values + 0.1
    if symmetric:
        centroids = torch.cat([-centroids[8:].flip(0), centroids[8:]])
    assert is_symmetric(centroids) == symmetric
    key_asm = groups.KEY_LUT_ASM_SYMMETRIC if symmetric else groups.KEY_LUT_ASM
    value_asm = groups.VALUE_LUT_ASM_SYMMETRIC if symmetric else groups.VALUE_LUT_ASM
    table = [int(v) & 0xFFFFFFFF for v in lut_table(centroids)[0].tolist()]
    assert torch.equal(lut_table(centroids), lut_table(centroids)[:1].expand(32, 8))  # one row per lane, all the same
    bits = _fp16_bits(centroids)
    rng = random.Random(0)
    words = [int.from_bytes(bytes([v, (v + 17) % 256, (3 * v) % 256, 255 - v]), "little") for v in range(256)]  # every byte in every slot
    words += [rng.getrandbits(32) for _ in range(64)]
    for t, u in zip(words, words[1:] + words[:1]):
        key = run_ptx(key_asm, {"$4": t, **{f"${5 + j}": table[j] for j in range(8)}})
        value = run_ptx(value_asm, {"$8": t, "$9": u, **{f"${10 + j}": table[j] for j in range(8)}})
        for i in range(4):
            bt, bu = t >> 8 * i & 0xFF, u >> 8 * i & 0xFF
            assert key[f"${i}"] == bits[bt & 15] | bits[bt >> 4] << 16
            assert value[f"${i}"] == bits[bt & 15] | bits[bu & 15] << 16  # channel 2i of tokens t, t + 1
            assert value[f"${4 + i}"] == bits[bt >> 4] | bits[bu >> 4] << 16  # channel 2i + 1


@pytest.mark.parametrize("d", [64, 128])
def test_int8_key_scores_follow_the_kernels_fragments_and_match_float_scores(d):
    """The int8 key path of `_tq_decode_lut_kernel`, emulated step by step on CPU: the exact PTX (`lut_asm_i8`)
    turns lane t's code words d/32 · t + j into the bytes of kernel channels 32j + 16h + 4t + i; the query, rotated
    into `key_channels_i8` order and rounded to int8 per column, meets them in an integer dot product, corrected by
    64 Σ q8 and scaled by max|q| / (127 s). Every byte of the 7-bit table is its centroid (no wrong entry or byte
    order), and the scores match ⟨Πq, c⟩ within the two roundings (~1e-2 relative with q8 alone, less with the query's
    remainder as a second int8 operand, KI8 = 2: then the table's 7 bits dominate), while a wrong channel order (the fp16 kernel's) is far off."""
    from tqpatch.kernels.groups import (I8_OFFSET, KEY_LUT_ASM_I8, int8_centroid_scale, key_channels, key_channels_i8, lut_table_i8)
    from tqpatch.kernels.ptx import run_ptx
    from tqpatch.packing import unpack_codes

    codec = TurboQuantCodec(d, 4, "mse", seed=3)
    gen = torch.Generator().manual_seed(d)
    parts = codec.encode(torch.randn(1, 1, 6, d, generator=gen))
    centroids = codec.quantizer.centroids("cpu")
    scale = int8_centroid_scale(centroids)
    table = [int(v) & 0xFFFFFFFF for v in lut_table_i8(centroids, scale)[0].tolist()]
    assert torch.equal(lut_table_i8(centroids, scale), lut_table_i8(centroids, scale)[:1].expand(32, 8))  # rows of 32 bytes, as `_table_word` reads
    u = torch.round(centroids.double() * scale).long() + I8_OFFSET
    assert u.min() >= 0 and u.max() <= 127
    assert ((u - I8_OFFSET) / scale - centroids.double()).abs().max() < 0.5 / scale + 1e-12
    words = parts["codes"].view(torch.int32)[0, 0]  # [T, d/8]
    codes = unpack_codes(parts["codes"], 4, d)[0, 0].long()  # [T, d] natural channel order
    kw = d // 32
    kernel_u = torch.zeros(words.shape[0], d, dtype=torch.long)
    for n in range(words.shape[0]):
        for t in range(4):  # lane % 4
            for j in range(kw):
                out = run_ptx(KEY_LUT_ASM_I8, {"$2": int(words[n, kw * t + j]) & 0xFFFFFFFF, **{f"${3 + k}": table[k] for k in range(4)}})
                for hh in range(2):
                    for i in range(4):
                        kernel_u[n, 32 * j + 16 * hh + 4 * t + i] = out[f"${hh}"] >> 8 * i & 0xFF
    assert torch.equal(kernel_u, u[codes[:, key_channels_i8(d)]])
    q = torch.randn(d, 3, generator=gen, dtype=torch.float64)  # rotated queries, natural order, 3 columns
    exact = centroids.double()[codes] @ q  # [T, 3]
    errors = {}
    for order, name in ((key_channels_i8(d), "int8"), (key_channels_i8(d), "int8+lo"), (key_channels(d), "wrong order")):
        qk = q[order]
        qmax = qk.abs().amax(0)
        qx = qk * (127 / qmax)
        q8 = torch.floor(qx + 0.5)
        if name == "int8+lo":  # KI8 == 2: the remainder in 1/128 steps, |q8lo| <= 64
            q8lo = torch.floor((qx - q8) * 128 + 0.5)
            assert q8lo.abs().max() <= 64
            q8 = q8 + q8lo / 128
        w = qmax / (127 * scale)
        scores = (kernel_u.double() @ q8) * w - I8_OFFSET * q8.sum(0) * w
        errors[name] = ((scores - exact).norm() / exact.norm()).item()
    assert errors["int8+lo"] < errors["int8"] < 1.5e-2 and errors["wrong order"] > 0.5, errors


def test_int8_value_ptx_gives_both_tokens_table_bytes_as_fp16_1024_plus_u():
    """The int8 value PTX (`value_lut_asm_i8`, interpreted on CPU): every byte of the same word of tokens t and t + 1
    becomes the fp16 pairs (1024 + u(t's code), 1024 + u(t + 1's code)) of its low- and high-nibble channels, as the
    fp16 value PTX pairs centroids; 1024 + u is exact in fp16, so (half − 1088) / s is the 7-bit table's centroid."""
    import random

    from tqpatch.kernels.groups import FP16_MAGIC, I8_OFFSET, VALUE_LUT_ASM_I8, int8_centroid_scale, int8_table_values, lut_table_i8
    from tqpatch.kernels.ptx import run_ptx

    gen = torch.Generator().manual_seed(1)
    centroids = torch.linspace(-2.0, 2.6, 16) + 0.05 * torch.rand(16, generator=gen)  # asymmetric, distinct bytes
    scale = int8_centroid_scale(centroids)
    u = int8_table_values(centroids, scale)
    assert len(set(u.tolist())) == 16
    table = [int(v) & 0xFFFFFFFF for v in lut_table_i8(centroids, scale)[0].tolist()]
    half = [int(v) & 0xFFFF for v in torch.tensor([FP16_MAGIC + x for x in u.tolist()], dtype=torch.float16).view(torch.int16).tolist()]
    rng = random.Random(0)
    words = [int.from_bytes(bytes([v, (v + 17) % 256, (3 * v) % 256, 255 - v]), "little") for v in range(256)]  # every byte in every slot
    words += [rng.getrandbits(32) for _ in range(64)]
    for t, w in zip(words, words[1:] + words[:1]):
        value = run_ptx(VALUE_LUT_ASM_I8, {"$8": t, "$9": w, **{f"${10 + j}": table[j] for j in range(4)}})
        for i in range(4):
            bt, bw = t >> 8 * i & 0xFF, w >> 8 * i & 0xFF
            assert value[f"${i}"] == half[bt & 15] | half[bw & 15] << 16  # channel 2i of tokens t, t + 1
            assert value[f"${4 + i}"] == half[bt >> 4] | half[bw >> 4] << 16  # channel 2i + 1
    decoded = (torch.tensor(half, dtype=torch.int16).view(torch.float16).double() - FP16_MAGIC - I8_OFFSET) / scale
    assert (decoded - centroids.double()).abs().max() <= 0.5 / scale + 1e-12
    # no inner block (`lut_asm_i8`'s) declares a register an enclosing block has: in PTX it would shadow the outer one
    # (reading an unset register), while run_ptx, which knows no scopes, would not notice
    scopes = []
    for line in VALUE_LUT_ASM_I8.splitlines():
        if line == "{":
            scopes.append(set())
        elif line == "}":
            scopes.pop()
        elif line.startswith(".reg"):
            names = {r.strip(" ;") for r in line.split(None, 2)[2].split(",")}
            assert not names & set().union(*scopes), names & set().union(*scopes)
            scopes[-1] |= names


@pytest.mark.parametrize("d", [64, 128])
def test_lut_kernel_value_rows_turn_its_transposed_tile_into_the_stored_values(d):
    """The LUT kernel's value operand Vᵀ [d, 16]: lane g reads bytes (d/16) g .. of token pairs, the value PTX gives
    per byte i the (low, high)-nibble channels as rows 16i + g and 16i + 8 + g; reading accᵀ's rows through
    value_rows is P·V over the natural decode."""
    from tqpatch.kernels.groups import value_rows

    gen = torch.Generator().manual_seed(d)
    centroids = torch.randn(16, generator=gen)
    codes = torch.randint(0, 256, (16, d // 2), generator=gen)
    lo, hi = centroids[codes & 15], centroids[codes >> 4]
    stored = torch.stack([lo, hi], -1).reshape(16, d)
    # the kernel's tile: (p, byte = (d/16) g + i, s, h) -> (i, h, g, p, s), token 2p + s, as in the kernel's permute
    tile = torch.stack([lo, hi], -1).reshape(8, 2, d // 2, 2).permute(0, 2, 1, 3)  # (p, byte, s, h)
    tile = tile.reshape(8, 8, d // 16, 2, 2).permute(2, 4, 1, 0, 3).reshape(d, 16)
    p = torch.randn(16, 3, generator=gen)
    assert torch.allclose((tile @ p)[torch.argsort(value_rows(d))], stored.T @ p, atol=1e-5)
    assert sorted(value_rows(d).tolist()) == list(range(d))


def test_lut_kernel_reads_codes_as_words_only_where_they_align():
    """The LUT kernel loads codes as int32 words (the same memory); a view that does not align falls back to the gather
    kernel (None), so misaligned bytes are never read as words."""
    from tqpatch.kernels import _as_words

    codes = torch.randint(0, 256, (2, 3, 10, 64), dtype=torch.uint8)
    words = _as_words(codes)
    assert words is not None and words.dtype == torch.int32 and words.shape == (2, 3, 10, 16)
    assert torch.equal(words.view(torch.uint8), codes)
    sliced = _as_words(codes[:, :, 3:])  # a token offset of 3 · 64 bytes: still aligned
    assert sliced is not None and torch.equal(sliced.view(torch.uint8), codes[:, :, 3:])
    assert _as_words(codes[..., 2:62]) is None  # starts 2 bytes in
    assert _as_words(codes[..., :62]) is None  # 62 bytes a token: not whole words


def test_warp_kernels_take_only_caches_whose_token_offsets_fit_int32():
    """The warp kernels address tokens by int32 offsets from each (batch, head) base: a cache whose token stride ×
    length reaches 2^31 elements goes to the split kernel instead (checked on the strides, no GPU needed)."""
    from tqpatch import kernels

    codec = TurboQuantCodec(128, 4, "mse", seed=0)
    parts = codec.encode(torch.randn(1, 2, 5, 128))
    group = kernels._groups(codec)[0]
    stride = max(parts[group.codes].stride(2), parts[group.norms].stride(2))
    assert stride == 64  # 128 4-bit codes per token
    assert kernels._token_offsets_fit_int32(parts, parts, group, group, (2**31 - 1) // stride)
    assert not kernels._token_offsets_fit_int32(parts, parts, group, group, 2**31 // stride)

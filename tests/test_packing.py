import pytest
import torch

from tqpatch.packing import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("d", [1, 3, 7, 64, 80, 128, 129])
def test_pack_round_trips_exactly(bits, d):
    gen = torch.Generator().manual_seed(bits * 1000 + d)
    codes = torch.randint(0, 2**bits, (5, 3, d), generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, 3, (d * bits + 7) // 8)
    assert torch.equal(unpack_codes(packed, bits, d), codes)


@pytest.mark.parametrize("d,bits,expected", [(128, 4, 64), (128, 2, 32), (128, 3, 48), (64, 3, 24), (80, 3, 30), (7, 3, 3), (128, 1, 16), (96, 5, 60)])
def test_packed_size_table(d, bits, expected):
    assert packed_nbytes(d, bits) == expected


def test_layout_is_lsb_first_stream():
    # 4 bits: code 2k in the low nibble of byte k.
    assert pack_codes(torch.tensor([0x3, 0xA]), 4).tolist() == [0xA3]
    # 3 bits: codes 5, 6, 7 -> stream 101 011 111 (LSB first) -> byte0 = 0b11110101, byte1 = 0b1
    assert pack_codes(torch.tensor([5, 6, 7]), 3).tolist() == [0b11110101, 0b1]


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True])
def test_bad_bits_name_valid_values(bits):
    with pytest.raises(ValueError, match=r"1\.\.8"):
        pack_codes(torch.zeros(4, dtype=torch.long), bits)


def test_unpack_checks_size():
    with pytest.raises(ValueError, match="expected 2 packed bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 4)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_byte_table_decodes_like_unpack(bits):
    from tqpatch.packing import byte_table

    values = torch.linspace(-1, 1, 2**bits)
    codes = torch.randint(0, 2**bits, (4, 37), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    decoded = byte_table(values, bits)[packed.long()].flatten(-2)[..., :37]
    assert torch.equal(decoded, values[codes])

"""Trellis-coded quantization (TCQ) of rotated unit vectors: TurboQuant_mse's bits, 1.3–1.7× less error.

TurboQuant_mse stores one b-bit code per rotated coordinate and decodes it alone: ŷ_t = c[code_t]. A scalar
code cannot beat the Lloyd-Max error (at 4 bits 2.4× the rate-distortion bound 4^-b of a Gaussian source).
A trellis code stores exactly the same b bits per coordinate, packed the same way, but decodes each
coordinate from a window of the code stream: with S "state bits",

    w_t = (the last S + b bits of code_0 … code_t, code_t in the low bits; bits before t = 0 are 0)
    ŷ_t = lut[w_t] / √d,            lut [2^(S+b)] float32, fitted once to N(0, 1) sequences

so which values code_t can pick depends on the codes before it. The encoder picks the whole sequence at once:
the Viterbi algorithm over the 2^S states (the stream's last S bits) finds the codes minimising Σ_t (y_t − ŷ_t)²
(2^(S+b) branch costs per coordinate). The table is fitted like a Lloyd-Max codebook, by alternating the
Viterbi encode of Gaussian sequences with centroid updates (lut[w] = mean of the samples coded by window w),
so decoded coordinates are conditional means again, which `coordinate_variance` and unbiased decoding assume.
This is trellis-coded quantization with a "bit-shift" trellis (Marcellin & Fischer 1990; QTIP, Tseng et al.
2024); TurboQuant's rotation makes every coordinate ≈ N(0, 1/d), the memoryless Gaussian source it is best at.

Each shipped table (codebooks/trellis_b{b}.safetensors) records its MSE; the gains are at `TRELLIS_STATE_BITS`.
Decoding is a gather. On CUDA the encoder is a Triton kernel (`kernels/viterbi.py`) and the split decode kernel
reads trellis codes by window (`kernels.triton_kernels._unpack_windows`); the warp kernels and the store kernel do not.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .codebook import codebook_dir
from .packing import unpack_codes

# State bits per code width: 2^(S + b) = 1,024 branch costs per coordinate (the Viterbi's work) everywhere. The
# shipped tables' unit-vector MSE against Lloyd-Max's at d = 64: 1.22× lower (1 bit), 1.44×, 1.57×, 1.59×, 1.49×,
# 1.28× (6 bits); at d = 128 1.27–1.71× (README, Trellis codes). At 7–8 bits this budget leaves S ≤ 3 and the
# trellis loses to Lloyd-Max (0.91× and 0.52× in a first fit), so those widths keep scalar codes.
TRELLIS_STATE_BITS = {1: 9, 2: 8, 3: 7, 4: 6, 5: 5, 6: 4}
TRELLIS_BITS = tuple(TRELLIS_STATE_BITS)
BUILD_COMMAND = "tqpatch build-codebooks --trellis --bits {b}"


@dataclass(frozen=True)
class TrellisCodebook:
    """lut [2^(state_bits + bits)] float32 at unit variance; `mse` per coordinate of N(0, 1) sequences of 64."""

    bits: int
    state_bits: int
    lut: torch.Tensor
    mse: float
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lut, lut², −2·lut) on `device`, made once per device (encode and decode run per chunk and layer)."""
        if device not in self._tables:
            lut = self.lut.to(device=device, dtype=torch.float32)
            self._tables[device] = (lut, lut.square(), -2.0 * lut)
        return self._tables[device]


def windows(codes: torch.Tensor, bits: int, state_bits: int) -> torch.Tensor:
    """Trellis windows w_t [..., T] int64 of codes [..., T] (b-bit integers, code 0 first; bits before it are 0)."""
    codes = codes.long()
    window_mask = (1 << (state_bits + bits)) - 1
    out = codes.clone()
    for back in range(1, -(-state_bits // bits) + 1):  # the ⌈S / b⌉ codes before t reach into the window
        out[..., back:] |= codes[..., :-back] << (back * bits)
    return out & window_mask


def viterbi_encode(y: torch.Tensor, book: TrellisCodebook) -> torch.Tensor:
    """The codes [N, T] int64 whose trellis decode minimises Σ_t (y_t − lut[w_t])², for y [N, T] at unit variance:
    on CUDA with Triton the kernel (`tqpatch.kernels.viterbi`, 35–210× faster than PyTorch there: bench/RESULTS.md, run 105),
    else `viterbi_encode_reference`."""
    if y.is_cuda and y.shape[0] > 0:
        from .kernels import triton_available

        if triton_available():
            from .kernels.viterbi import viterbi_encode_triton

            _, lut_sq, lut_m2 = book.tables(y.device)
            return viterbi_encode_triton(y.float().contiguous(), lut_sq, lut_m2, book.bits, book.state_bits)
    return viterbi_encode_reference(y, book)


def viterbi_encode_reference(y: torch.Tensor, book: TrellisCodebook, batch: int = 1024) -> torch.Tensor:
    """`viterbi_encode` in PyTorch (any device; the oracle of the kernel's tests), `batch` vectors at a time.

    Forward: cost'[s'] = min over the 2^b predecessors s of cost[s] + (y_t − lut[w])² (the y_t² common to all
    is left out), with the window w = s·2^b + code = a·2^S + s' (a: the top b bits that leave the state):
    [N, 2^S, 2^b] for the add and [N, 2^b, 2^S] for the min are two views of the same [N, 2^(S+b)] tensor.
    Backward: from the cheapest final state, recompute the 2^b candidates of the state chosen at each step from
    the stored costs (a min without indices, and [N, 2^b] work per step back, is cheaper than an argmin)."""
    if y.shape[0] > batch:
        return torch.cat([viterbi_encode_reference(part, book, batch) for part in y.split(batch)])
    n, t_len = y.shape
    bits, state_bits = book.bits, book.state_bits
    _, lut_sq, lut_m2 = book.tables(y.device)
    y = y.float()
    cost = torch.full((n, 1 << state_bits), math.inf, device=y.device)
    cost[:, 0] = 0.0
    costs = torch.empty(t_len, n, 1 << state_bits, device=y.device)  # cost of each state before step t
    for t in range(t_len):
        costs[t] = cost
        branch = torch.addcmul(lut_sq, y[:, t : t + 1], lut_m2)  # (y_t − lut[w])² − y_t²: [N, 2^(S+b)]
        branch.view(n, 1 << state_bits, 1 << bits).add_(cost.unsqueeze(-1))
        cost = branch.view(n, 1 << bits, 1 << state_bits).amin(dim=1)
    state = cost.argmin(dim=1)
    leaving = torch.arange(1 << bits, device=y.device) << state_bits  # a·2^S
    windows_out = torch.empty(n, t_len, dtype=torch.long, device=y.device)
    for t in range(t_len - 1, -1, -1):
        candidates = leaving | state[:, None]  # the windows into state s': [N, 2^b]
        total = costs[t].gather(1, candidates >> bits) + torch.addcmul(lut_sq[candidates], y[:, t : t + 1], lut_m2[candidates])
        window = candidates.gather(1, total.argmin(dim=1, keepdim=True)).squeeze(1)
        windows_out[:, t] = window
        state = window >> bits
    return windows_out & ((1 << bits) - 1)


def decode(codes: torch.Tensor, book: TrellisCodebook) -> torch.Tensor:
    """lut[w_t]: codes [..., T] -> [..., T] float32 at unit variance."""
    return book.tables(codes.device)[0][windows(codes, book.bits, book.state_bits)]


def decode_packed(packed: torch.Tensor, book: TrellisCodebook, length: int) -> torch.Tensor:
    """`decode` of bit-packed codes (`packing.pack_codes`): [..., nbytes] uint8 -> [..., length] float32."""
    return decode(unpack_codes(packed, book.bits, length), book)


def fit_trellis(bits: int, state_bits: int, iterations: int = 40, vectors: int = 8000, length: int = 64,
                seed: int = 0, progress=None) -> TrellisCodebook:
    """Fit lut to N(0, 1) sequences of `length`: start from Gaussian draws, then alternate the Viterbi encode of
    fresh samples with centroid updates lut[w] = mean of the samples coded through w (windows never used keep
    their value). `progress(iteration, mse)` is called after each round. Returns the book with the MSE of a
    last, held-out sample."""
    generator = torch.Generator().manual_seed(seed)
    size = 1 << (state_bits + bits)
    lut = torch.randn(size, generator=generator)
    for iteration in range(iterations):
        y = torch.randn(vectors, length, generator=generator)
        book = TrellisCodebook(bits, state_bits, lut, math.nan)
        w = windows(viterbi_encode(y, book), bits, state_bits).flatten()
        sums = torch.zeros(size).index_add_(0, w, y.flatten())
        counts = torch.zeros(size).index_add_(0, w, torch.ones(w.numel()))
        if progress is not None:
            progress(iteration, (y - lut[w].view_as(y)).square().mean().item())
        lut = torch.where(counts > 0, sums / counts.clamp_min(1), lut)
    y = torch.randn(vectors, length, generator=generator)
    book = TrellisCodebook(bits, state_bits, lut, math.nan)
    mse = (y - decode(viterbi_encode(y, book), book)).square().mean().item()
    return TrellisCodebook(bits, state_bits, lut, mse)


def trellis_path(bits: int, folder: Path | None = None) -> Path:
    return (folder or codebook_dir()) / f"trellis_b{bits}.safetensors"


def save_trellis(book: TrellisCodebook, folder: Path | None = None) -> Path:
    from safetensors.torch import save_file

    path = trellis_path(book.bits, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"bits": str(book.bits), "state_bits": str(book.state_bits), "mse": repr(book.mse)}
    save_file({"lut": book.lut.float().contiguous()}, str(path), metadata=meta)
    return path


def check_trellis_bits(bits: int) -> None:
    if bits not in TRELLIS_STATE_BITS:
        raise ValueError(f"trellis codes are for {min(TRELLIS_BITS)}-{max(TRELLIS_BITS)} bits per group, got {bits}")


@functools.lru_cache(maxsize=None)
def get_trellis(bits: int) -> TrellisCodebook:
    """The shipped trellis codebook for `bits` (codebooks/trellis_b{bits}.safetensors)."""
    from safetensors import safe_open

    check_trellis_bits(bits)
    path = trellis_path(bits)
    if not path.exists():
        raise FileNotFoundError(f"no trellis codebook {path}; build it with: {BUILD_COMMAND.format(b=bits)}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        lut = f.get_tensor("lut")
    return TrellisCodebook(int(meta["bits"]), int(meta["state_bits"]), lut, float(meta["mse"]))


@functools.lru_cache(maxsize=None)
def unit_vector_mse(d: int, bits: int, samples: int = 2048) -> float:
    """E‖u − ũ‖² of a uniform unit vector u ∈ R^d under the trellis code (Monte Carlo, fixed seed; the first
    coordinates of a sequence have fewer choices, so it depends a little on d): the D that `TurboQuantMSE`'s
    `decode_gain` and `coordinate_variance` use."""
    book = get_trellis(bits)
    u = torch.randn(samples, d, generator=torch.Generator().manual_seed(12345))
    y = u / u.norm(dim=-1, keepdim=True) * math.sqrt(d)
    return (y - decode(viterbi_encode(y, book), book)).square().sum(-1).mean().item() / d

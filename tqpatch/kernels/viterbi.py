"""The trellis encoder (`tqpatch.trellis.viterbi_encode`) as a Triton kernel: one program per `VECTORS` vectors.

For y [N, T] at unit variance and a book of b bits and S state bits, each program runs the Viterbi forward pass
with its vectors' state costs in registers:

    tot[v, w] = cost[v, w >> b] + lut²[w] − 2 y_t lut[w]        w = s·2^b + c: previous state s, code c   [V, 2^S, 2^b]
    cost'[v, s'] = min_a tot[v, a·2^S + s'],   choice[v, t, s'] = argmin_a                                   [V, 2^b, 2^S]

(the two shapes are row-major views of the same windows w, so a reshape turns the first into the second), writes
the b-bit choices (int8, [V, T, 2^S] per program) to a scratch buffer, and walks them back from the cheapest final
state: w = choice·2^S + s', code_t = w mod 2^b, s = w >> b. Same result as the PyTorch reference up to float ties;
the scratch is written in slices of at most `SCRATCH_BYTES`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

VECTORS = 2  # vectors per program: [2, 1024] costs per step over 4 warps
SCRATCH_BYTES = 64 << 20  # choices [vectors, T, 2^S] int8 per launch


@triton.jit
def _viterbi_kernel(y_ptr, lut_sq_ptr, lut_m2_ptr, choice_ptr, codes_ptr, N, T: tl.constexpr, BITS: tl.constexpr,
                    SBITS: tl.constexpr, V: tl.constexpr):
    C: tl.constexpr = 1 << BITS
    NS: tl.constexpr = 1 << SBITS
    pid = tl.program_id(0)
    rows = pid * V + tl.arange(0, V)  # [V]
    rmask = rows < N
    states = tl.arange(0, NS)
    windows = states[:, None] * C + tl.arange(0, C)[None, :]  # [NS, C]: previous state, code
    lut_sq = tl.load(lut_sq_ptr + windows)[None]  # [1, NS, C]
    lut_m2 = tl.load(lut_m2_ptr + windows)[None]
    cost = tl.where(states[None, :] == 0, 0.0, float("inf")) + tl.zeros((V, NS), tl.float32)  # the stream starts in state 0
    y_rows = y_ptr + rows.to(tl.int64) * T  # [V] row pointers of y, the codes and the choices
    code_rows = codes_ptr + rows.to(tl.int64) * T
    choice_rows = choice_ptr + rows.to(tl.int64) * (T * NS)
    for t in range(T):
        y = tl.load(y_rows + t, mask=rmask, other=0.0)  # [V]
        tot = (lut_sq + y[:, None, None] * lut_m2) + cost[:, :, None]  # [V, NS, C], summed in the reference's order
        tot = tl.reshape(tot, (V, C, NS))  # the same windows as (leaving bits a, next state s')
        cost = tl.min(tot, axis=1)
        tl.store(choice_rows[:, None] + t * NS + states[None, :], tl.argmin(tot, axis=1).to(tl.int8), mask=rmask[:, None])
    state = tl.argmin(cost, axis=1).to(tl.int32)  # [V] the cheapest final state
    tl.debug_barrier()  # the choices written above are read back by other threads of this program
    for i in range(T):
        t = T - 1 - i
        leaving = tl.load(choice_rows + t * NS + state, mask=rmask, other=0).to(tl.int32)
        window = leaving * NS + state
        tl.store(code_rows + t, (window & (C - 1)).to(tl.uint8), mask=rmask)
        state = window >> BITS


def viterbi_encode_triton(y: torch.Tensor, lut_sq: torch.Tensor, lut_m2: torch.Tensor, bits: int, state_bits: int) -> torch.Tensor:
    """codes [N, T] int64 for y [N, T] (float32, contiguous) and the book's lut² and −2·lut [2^(S+b)] on y's device."""
    n, t_len = y.shape
    codes = torch.empty(n, t_len, dtype=torch.uint8, device=y.device)
    per_vector = t_len << state_bits
    slice_rows = max(VECTORS, SCRATCH_BYTES // per_vector // VECTORS * VECTORS)
    scratch = torch.empty(min(n, slice_rows) * per_vector, dtype=torch.int8, device=y.device)
    for start in range(0, n, slice_rows):
        part = y[start : start + slice_rows]
        rows = part.shape[0]
        _viterbi_kernel[(triton.cdiv(rows, VECTORS),)](part, lut_sq, lut_m2, scratch, codes[start : start + rows], rows, T=t_len,
                                                        BITS=bits, SBITS=state_bits, V=VECTORS, num_warps=4)
    return codes.long()

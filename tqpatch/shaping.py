"""Query-shaped key error: a per-head linear map that puts TurboQuant's key error where queries do not look.

TurboQuant's error on a stored vector y is isotropic: E[e eᵀ] = σ² I with
σ² ∝ ‖y‖². For keys only the score error q·e matters, and queries of one
head are far from isotropic (their second moment has an effective rank of
about 4 of 64 on SmolLM2). Storing y = A k instead of k, and scoring with
A⁻¹q (q·k = (A⁻¹q)·(A k), A symmetric), the score error variance over queries
and keys becomes

    E[(A⁻¹q · e)²] ∝ tr(Σ_q A⁻²) · tr(A² Σ_k),      Σ_q = E[q qᵀ], Σ_k = E[k kᵀ],

which the matrix geometric mean minimises (A = I gives tr Σ_q · tr Σ_k):

    A² = P = Σ_k^{-1/2} (Σ_k^{1/2} Σ_q Σ_k^{1/2})^{1/2} Σ_k^{-1/2},
    gain = tr((Σ_k^{1/2} Σ_q Σ_k^{1/2})^{1/2})² / (tr Σ_q · tr Σ_k) ≤ 1.

Keys are stored after RoPE, so Σ_q and Σ_k are the second moments of the
*post*-RoPE vectors over the positions a sequence will use. They are
estimated from the first chunk's pre-RoPE queries and keys (which do not
depend on position), averaged over RoPE rotations of positions 0..horizon-1
(`rope_average`), and shrunk towards a multiple of I (few tokens, 64-256
dimensions). Nothing is stored per token; A is per layer and KV head.
"""

from __future__ import annotations

import torch

from .rope import RopeTable, rotate_half

SHRINK = 0.5  # weight of the isotropic part in both second moments (first chunks are short)
# What the first chunk's second moments are shrunk towards (`shape_prior`): (share of their own diagonal, share of
# a multiple of I). "diagonal" keeps half of each moment's off-diagonal part and little isotropy: on Gemma-3
# (QK-norm: per-channel scales set most of the anisotropy) it takes the full layers' score-error gain from −5.8 to
# −10.9 dB, on SmolLM2 from −2.2 to −2.3 dB (eval/experiments/shaping_prior_oracle.py).
SHAPE_PRIORS = {"isotropic": (0.0, SHRINK), "diagonal": (0.5, 0.1)}
HORIZON = 2048  # positions RoPE is averaged over


def rope_average(sigma: torch.Tensor, table: RopeTable, horizon: int = HORIZON) -> torch.Tensor:
    """E_p[R_p Σ R_pᵀ] over positions 0..horizon-1 for pre-RoPE second moments sigma [..., d, d] (float64).

    With R_p = C_p + S_p J (C, S diagonal cos/sin, J = rotate_half as a matrix):
    R Σ Rᵀ = CΣC + CΣJᵀS + SJΣC + SJΣJᵀS, so only E[c_i c_j], E[c_i s_j], E[s_i s_j] are needed.
    """
    d = sigma.shape[-1]
    cos, sin = table.cos_sin(torch.arange(horizon), torch.device("cpu"))
    cos, sin = cos.double(), sin.double()
    ecc, ess, ecs = cos.T @ cos / horizon, sin.T @ sin / horizon, cos.T @ sin / horizon  # [d, d]
    j = rotate_half(torch.eye(d, dtype=torch.float64)).T  # j @ x == rotate_half(x)
    sigma = sigma.double().cpu()
    return sigma * ecc + (sigma @ j.T) * ecs + (j @ sigma) * ecs.T + (j @ sigma @ j.T) * ess


def _shrunk(sigma: torch.Tensor, shrink: float, diagonal_share: float = 0.0) -> torch.Tensor:
    """(1 − shrink)·Σ' + shrink·(tr Σ / d)·I with Σ' = (1 − diagonal_share)·Σ + diagonal_share·diag(Σ)."""
    d = sigma.shape[-1]
    if diagonal_share:
        sigma = (1 - diagonal_share) * sigma + diagonal_share * torch.diag_embed(sigma.diagonal(dim1=-2, dim2=-1))
    scale = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] / d
    return (1 - shrink) * sigma + shrink * scale * torch.eye(d, dtype=sigma.dtype)


def _power(m: torch.Tensor, power: float) -> torch.Tensor:
    """m^power for symmetric positive semi-definite m [..., d, d] (eigenvalues floored at 1e-9 of the largest)."""
    values, vectors = torch.linalg.eigh(m)
    values = values.maximum(values.amax(-1, keepdim=True) * 1e-9)
    return (vectors * values[..., None, :] ** power) @ vectors.transpose(-1, -2)


def shaping_transform(sigma_q: torch.Tensor, sigma_k: torch.Tensor, shrink: float = SHRINK, diagonal_share: float = 0.0) -> torch.Tensor:
    """A [..., d, d] float32, symmetric with det 1, minimising tr(Σ_q A⁻²)·tr(A² Σ_k) (module docstring).

    sigma_q, sigma_k [..., d, d]: post-RoPE second moments (any scale), shrunk first (`_shrunk`; `SHAPE_PRIORS`).
    The scale of A does not matter (TurboQuant stores the norm); `stored_transform` rounds it and gives its inverse."""
    sq, sk = _shrunk(sigma_q.double(), shrink, diagonal_share), _shrunk(sigma_k.double(), shrink, diagonal_share)
    sk_half, sk_inv_half = _power(sk, 0.5), _power(sk, -0.5)
    p = sk_inv_half @ _power(sk_half @ sq @ sk_half, 0.5) @ sk_inv_half
    values, vectors = torch.linalg.eigh((p + p.transpose(-1, -2)) / 2)
    values = values.clamp_min(values.amax(-1, keepdim=True) * 1e-9)
    values = values / values.log().mean(-1, keepdim=True).exp()  # det P = 1
    return ((vectors * values[..., None, :].sqrt()) @ vectors.transpose(-1, -2)).float()  # A = P^{1/2}


def diagonal_transform(sigma_q: torch.Tensor, sigma_k: torch.Tensor, shrink: float = SHRINK) -> torch.Tensor:
    """a [..., d] float32, the diagonal map diag(a) (det 1) minimising tr(Σ_q A⁻²)·tr(A² Σ_k) among diagonal A with
    a_i = a_{i + d/2}: a_i² ∝ sqrt(q_i / k_i), q_i and k_i the diagonals of the shrunk second moments averaged over
    each RoPE pair (i, i + d/2). It costs d numbers per head where A costs d²/2, which is what makes shaping
    affordable on sliding-window layers: on Gemma-3's it keeps −1.8 dB of the −2.2 dB of score error that a full A
    would save (eval/experiments/shaping_prior_oracle.py), for 2d bytes per head instead of about d²/2."""
    d = sigma_q.shape[-1]
    q = _shrunk(sigma_q.double(), shrink).diagonal(dim1=-2, dim2=-1)
    k = _shrunk(sigma_k.double(), shrink).diagonal(dim1=-2, dim2=-1)
    pair_mean = lambda x: torch.cat([(x[..., : d // 2] + x[..., d // 2 :]) / 2] * 2, dim=-1)  # noqa: E731
    a = (pair_mean(q) / pair_mean(k).clamp_min(1e-30)).clamp_min(1e-12) ** 0.25
    return (a / a.log().mean(-1, keepdim=True).exp()).float()


def eigen_ordered(a: torch.Tensor, sigma_k: torch.Tensor) -> torch.Tensor:
    """B = Qᵀ A [..., d, d] float64: A followed by the rotation into the eigenbasis of the shaped keys'
    second moment A Σ_k A = Q diag(μ) Qᵀ, eigenvalues μ descending.

    With A the geometric-mean shaping, both the shaped second moment and the shaped score metric
    A⁻¹ Σ_q A⁻¹ are diagonal in this basis with the same eigenvalues μ_i = sqrt(λ_i), λ_i those of
    Σ_q^{1/2} Σ_k Σ_q^{1/2}. So coordinate i of B k carries a share μ_i / Σμ of both the key energy
    and the score error: the leading coordinates are where extra bits pay (transform coding), which
    is what an eigen split (`TurboQuantConfig.key_split`) gives them."""
    a, sigma_k = a.double(), sigma_k.double()
    values, vectors = torch.linalg.eigh(a @ sigma_k @ a.transpose(-1, -2))
    order = values.argsort(dim=-1, descending=True)
    vectors = torch.gather(vectors, -1, order[..., None, :].expand_as(vectors))
    return vectors.transpose(-1, -2) @ a


def stored_transform(a: torch.Tensor, symmetric: bool = True, entry_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(Â, Â⁻¹) [..., d, d] float32: A rounded to what is stored, `entry_bits`-bit integers (8 or 4) with one
    float16 scale per row.

    symmetric: only the upper triangle is stored and mirrored, so Â stays symmetric; else the whole
    matrix. Â⁻¹ is derived from Â, so encode (Â) and decode/queries (Â⁻¹) agree exactly and only Â
    counts as stored: rounding A costs a little shaping gain, never correctness."""
    if entry_bits not in (4, 8):
        raise ValueError(f"entry_bits must be 4 or 8, got {entry_bits!r}")
    a = a.double()
    d = a.shape[-1]
    top = 2 ** (entry_bits - 1) - 1  # 127 or 7
    upper = torch.ones(d, d, dtype=torch.bool).triu() if symmetric else torch.ones(d, d, dtype=torch.bool)
    scale = (a.abs() * upper).amax(-1, keepdim=True).clamp_min(1e-30) / top  # [..., d, 1], row i covers j >= i
    scale = scale.half().double()
    rounded = torch.round(a / scale).clamp(-top, top) * scale
    stored = torch.where(upper, rounded, rounded.transpose(-1, -2))
    return stored.float(), torch.linalg.inv(stored).float()


def stored_nbytes(heads: int, head_dim: int, symmetric: bool = True, entry_bits: int = 8) -> int:
    """Bytes of `stored_transform`'s Â for `heads` heads: the upper triangle (or whole matrix) at
    `entry_bits` per entry + float16 row scales."""
    entries = head_dim * (head_dim + 1) // 2 if symmetric else head_dim * head_dim
    return heads * ((entries * entry_bits + 7) // 8 + 2 * head_dim)


def shaping_gain(sigma_q: torch.Tensor, sigma_k: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """tr(Σ_q A⁻²)·tr(A² Σ_k) / (tr Σ_q · tr Σ_k) [...]: the score error variance with A relative to A = I."""
    a = a.double()
    a_inv = torch.linalg.inv(a)
    tr = lambda m: m.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    sq, sk = sigma_q.double(), sigma_k.double()
    return tr(sq @ a_inv @ a_inv) * tr(a @ a @ sk) / (tr(sq) * tr(sk))


class QueryMoments:
    """Running E[q qᵀ] of pre-RoPE queries per KV head, summed over the query heads that share it."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None  # [Hkv, d, d] float64 (CPU)
        self.count = 0

    def observe(self, queries: torch.Tensor, kv_heads: int) -> None:
        """queries [B, T, Hq, d] (pre-RoPE), Hq a multiple of kv_heads."""
        b, t, hq, d = queries.shape
        q = queries.detach().double().reshape(b * t, kv_heads, hq // kv_heads, d)
        moments = torch.einsum("nhgi,nhgj->hij", q, q).cpu()
        self.total = moments if self.total is None else self.total + moments
        self.count += b * t

    @property
    def mean(self) -> torch.Tensor | None:
        return None if self.total is None else self.total / self.count

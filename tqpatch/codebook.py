"""Lloyd-Max scalar codebooks for one coordinate of a rotated unit vector.

If u is uniform on the unit sphere S^{d-1} (which Π x/‖x‖ is, for a Haar
rotation Π), each coordinate t = u_j has density

    f_d(t) = Γ(d/2) / (√π Γ((d-1)/2)) · (1 - t²)^((d-3)/2),   t ∈ [-1, 1],

i.e. (1 + t)/2 ~ Beta((d-1)/2, (d-1)/2). The b-bit Lloyd-Max quantizer for
f_d minimises E[(t - Q(t))²]; its 2^b centroids c_k and the midpoints
between them (the decision boundaries) are what TurboQuant_mse uses.

Solver: Lloyd's iteration then Newton steps on the same fixed-point
conditions, started from the high-resolution (f^(1/3)) point density. Every integral
it needs has a closed form:
  mass     ∫_lo^hi f_d      = I_{(1+hi)/2}(a, a) - I_{(1+lo)/2}(a, a), a = (d-1)/2
  moment   ∫_lo^hi t f_d    = C_d/(d-1) · [(1-lo²)^((d-1)/2) - (1-hi²)^((d-1)/2)]
so the centroid update c_k = moment/mass is exact (scipy.special.betainc).
The per-coordinate distortion recorded in each file is integrated
independently with scipy.integrate.quad, and tests compare both.

Shipped files: codebooks/d{d}_b{b}.safetensors with tensors `centroids`
[2^b] and `boundaries` [2^b - 1] (float64, unit-sphere scale) and header
metadata d, bits, tolerance, solver_version, distortion.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .packing import check_bits

SOLVER_VERSION = "lloyd-max-beta/1"
DEFAULT_TOLERANCE = 1e-10
SHIPPED_DIMS = (16, 24, 26, 28, 32, 36, 38, 40, 48, 64, 80, 96, 112, 128, 160, 192, 256)  # 24 + 40, 26 + 38, 28 + 36: the groups of eigen splits at d 64 (e4.2 at 2.75 bits and e6.2 at 3.5, e3.1 at 1.8, e6.2 at 3.75)
SHIPPED_BITS = tuple(range(1, 9))
BUILD_COMMAND = "tqpatch build-codebooks --dims {d} --bits {b}"


def codebook_dir() -> Path:
    """Folder holding the shipped .safetensors codebooks (repo's codebooks/, installed as tqpatch/codebooks)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "codebooks", here.parent / "codebooks"):
        if candidate.is_dir():
            return candidate
    return here.parent / "codebooks"


@dataclass(frozen=True)
class Codebook:
    """A b-bit Lloyd-Max codebook for dimension d (unit-sphere scale)."""

    d: int
    bits: int
    centroids: torch.Tensor  # [2^b] float64, sorted ascending
    boundaries: torch.Tensor  # [2^b - 1] float64, midpoints of consecutive centroids
    distortion: float  # E[(t - Q(t))^2] for one coordinate; d * distortion = MSE of a unit vector
    tolerance: float

    @property
    def unit_vector_mse(self) -> float:
        return self.d * self.distortion


def _log_normaliser(d: int) -> float:
    """log C_d with C_d = Γ(d/2) / (√π Γ((d-1)/2))."""
    return math.lgamma(d / 2) - 0.5 * math.log(math.pi) - math.lgamma((d - 1) / 2)


def coordinate_density(t: np.ndarray, d: int) -> np.ndarray:
    """f_d(t) on [-1, 1] (zero outside)."""
    t = np.asarray(t, dtype=np.float64)
    inside = np.abs(t) < 1
    out = np.zeros_like(t)
    out[inside] = np.exp(_log_normaliser(d) + (d - 3) / 2 * np.log1p(-t[inside] ** 2))
    return out


def coordinate_cdf(t: np.ndarray, d: int) -> np.ndarray:
    from scipy.special import betainc

    a = (d - 1) / 2
    return betainc(a, a, np.clip((1 + np.asarray(t, dtype=np.float64)) / 2, 0.0, 1.0))


def _interval_moments(lo: np.ndarray, hi: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(mass, first moment) of f_d on each interval [lo_k, hi_k]."""
    mass = coordinate_cdf(hi, d) - coordinate_cdf(lo, d)
    c = math.exp(_log_normaliser(d)) / (d - 1)
    power = (d - 1) / 2
    moment = c * ((1 - lo**2) ** power - (1 - hi**2) ** power)
    return mass, moment


def _lloyd_residual(centroids: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For centroids c: cells (boundaries = midpoints), their mass p, moment m, and edges."""
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    edges = np.concatenate([[-1.0], boundaries, [1.0]])
    mass, moment = _interval_moments(edges[:-1], edges[1:], d)
    return mass, moment, edges, boundaries


def _newton_step(centroids: np.ndarray, d: int) -> np.ndarray:
    """One Newton step on G_k(c) = c_k p_k(c) - m_k(c) = 0 (the Lloyd-Max conditions).

    With β_k = (c_k + c_{k+1})/2 the inner boundaries, dF/dβ = f(β), dM/dβ = β f(β):
      ∂G_k/∂c_{k+1} =  ½ f(β_k) (c_k - β_k)
      ∂G_k/∂c_{k-1} = -½ f(β_{k-1}) (c_k - β_{k-1})
      ∂G_k/∂c_k     =  p_k + ∂G_k/∂c_{k+1} + ∂G_k/∂c_{k-1}
    """
    mass, moment, edges, boundaries = _lloyd_residual(centroids, d)
    levels = len(centroids)
    residual = centroids * mass - moment
    f_b = coordinate_density(boundaries, d)
    upper = 0.5 * f_b * (centroids[:-1] - boundaries)  # ∂G_k/∂c_{k+1}, k = 0..L-2
    lower = -0.5 * f_b * (centroids[1:] - boundaries)  # ∂G_k/∂c_{k-1}, k = 1..L-1
    jac = np.diag(mass.copy())
    idx = np.arange(levels - 1)
    jac[idx, idx + 1] = upper
    jac[idx, idx] += upper
    jac[idx + 1, idx] = lower
    jac[idx + 1, idx + 1] += lower
    return centroids - np.linalg.solve(jac, residual)


def solve_lloyd_max(d: int, bits: int, tolerance: float = DEFAULT_TOLERANCE, max_iter: int = 500) -> tuple[np.ndarray, int]:
    """Lloyd-Max centroids for f_d. Returns (sorted centroids [2^bits], iterations).

    Lloyd's fixed point c_k = E[t | cell k] (cells bounded by midpoints) is
    found by Lloyd iterations (globally convergent, slow) followed by Newton
    steps on the same conditions (quadratic), until the largest centroid move
    is below `tolerance` in units of the coordinate scale 1/√d.
    """
    from scipy.special import betaincinv

    if d < 3:
        raise ValueError(f"head dimension must be at least 3 for the sphere density, got {d}")
    check_bits(bits)
    levels = 2**bits
    scale = 1 / math.sqrt(d)
    # High-resolution start (Panter-Dite): optimal centroid density is ∝ f^(1/3).
    # f_d^(1/3) ∝ (1-t²)^((d-3)/6) = f_{d'} with d' = (d-3)/3 + 3, so take the
    # equal-mass points of f_{d'}.
    a = ((d - 3) / 3 + 2) / 2
    probs = (np.arange(levels) + 0.5) / levels
    centroids = 2 * betaincinv(a, a, probs) - 1
    move = np.inf
    for iteration in range(1, max_iter + 1):
        mass, moment, edges, _ = _lloyd_residual(centroids, d)
        lloyd = np.where(mass > 0, moment / np.maximum(mass, 1e-300), (edges[:-1] + edges[1:]) / 2)
        updated = lloyd
        if iteration > 20:
            newton = _newton_step(centroids, d)
            if np.all(np.diff(newton) > 0) and newton[0] > -1 and newton[-1] < 1:
                updated = newton
        move = np.max(np.abs(updated - centroids)) / scale
        centroids = updated
        if move < tolerance:
            return centroids, iteration
    raise RuntimeError(f"Lloyd-Max did not converge for d={d}, bits={bits} in {max_iter} iterations (last move {move:.3e})")


def coordinate_distortion(centroids: np.ndarray, d: int) -> float:
    """E[(t - Q(t))²] under f_d, integrated with scipy.integrate.quad cell by cell."""
    from scipy.integrate import quad

    boundaries = (centroids[1:] + centroids[:-1]) / 2
    edges = np.concatenate([[-1.0], boundaries, [1.0]])
    total = 0.0
    for c, lo, hi in zip(centroids, edges[:-1], edges[1:]):
        value, _ = quad(lambda t: (t - c) ** 2 * coordinate_density(np.array([t]), d)[0], lo, hi, epsabs=1e-14, epsrel=1e-10, limit=200)
        total += value
    return total


def build_codebook(d: int, bits: int, tolerance: float = DEFAULT_TOLERANCE) -> Codebook:
    centroids, _ = solve_lloyd_max(d, bits, tolerance)
    c = torch.from_numpy(centroids)
    return Codebook(
        d=d,
        bits=bits,
        centroids=c,
        boundaries=(c[1:] + c[:-1]) / 2,
        distortion=coordinate_distortion(centroids, d),
        tolerance=tolerance,
    )


def codebook_path(d: int, bits: int, folder: Path | None = None) -> Path:
    return (folder or codebook_dir()) / f"d{d}_b{bits}.safetensors"


def save_codebook(book: Codebook, folder: Path | None = None) -> Path:
    from safetensors.torch import save_file

    path = codebook_path(book.d, book.bits, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "d": str(book.d),
        "bits": str(book.bits),
        "tolerance": repr(book.tolerance),
        "solver_version": SOLVER_VERSION,
        "distortion": repr(book.distortion),
    }
    save_file({"centroids": book.centroids.contiguous(), "boundaries": book.boundaries.contiguous()}, str(path), metadata=metadata)
    return path


def load_codebook_file(path: Path) -> Codebook:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        centroids = f.get_tensor("centroids")
        boundaries = f.get_tensor("boundaries")
    return Codebook(
        d=int(meta["d"]),
        bits=int(meta["bits"]),
        centroids=centroids,
        boundaries=boundaries,
        distortion=float(meta["distortion"]),
        tolerance=float(meta["tolerance"]),
    )


@functools.lru_cache(maxsize=None)
def get_codebook(d: int, bits: int) -> Codebook:
    """The codebook for (d, bits): the shipped file if there is one, else solved now (with a warning)."""
    check_bits(bits)
    if not isinstance(d, int) or d < 3:
        raise ValueError(f"head_dim must be an integer >= 3, got {d!r}")
    path = codebook_path(d, bits)
    if path.exists():
        return load_codebook_file(path)
    warnings.warn(
        f"no shipped codebook for d={d}, bits={bits}; solving it now (seconds). "
        f"To ship it, run: {BUILD_COMMAND.format(d=d, b=bits)}",
        stacklevel=2,
    )
    return build_codebook(d, bits)

"""Distortion of TurboQuant_mse and TurboQuant_prod on random unit vectors.

Reproduces the paper's distortion figure: measured MSE E‖x - x̃‖² and
inner-product error E(⟨q, x⟩ - ⟨q, x̃⟩)² for unit x, against the upper bound
(√3·π/2)·4^-b (for the inner product: ×‖q‖²/d) and the lower bound 4^-b.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tqpatch.quantizer import TurboQuantMSE, TurboQuantProd
from tqpatch.trellis import TRELLIS_BITS
from tqpatch.eval.plotting import pyplot, save_figure

UPPER_CONSTANT = math.sqrt(3) * math.pi / 2


@dataclass
class DistortionRow:
    method: str  # "mse", "prod" or "trellis" (TurboQuant_mse's bits as trellis codes, tqpatch/trellis.py)
    bits: int
    mse: float  # E‖x - x̃‖² over unit vectors
    ip_error_var: float  # E(⟨q, x⟩ - ⟨q, x̃⟩)² with ‖q‖ = 1, times d (so it is comparable across d)
    ip_bias: float  # mean of ⟨q, x̃⟩ - ⟨q, x⟩, times √d
    mse_upper_bound: float
    mse_lower_bound: float
    ip_upper_bound: float  # √3·π²·4^-b: the paper's bound on d·E(IP error)² for TurboQuant_prod, ‖q‖ = 1


@dataclass
class DistortionResult:
    head_dim: int
    num_vectors: int
    seed: int
    rows: list[DistortionRow]

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [
            f"d = {self.head_dim}, {self.num_vectors} random unit vectors, seed {self.seed}",
            f"{'method':<7} {'bits':>4} {'MSE':>10} {'MSE upper':>10} {'lower':>8} {'d·IP err²':>10} {'IP upper':>9} {'√d·bias':>9}",
        ]
        for r in self.rows:
            lines.append(
                f"{r.method:<7} {r.bits:>4} {r.mse:>10.5f} {r.mse_upper_bound:>10.5f} {r.mse_lower_bound:>8.5f} {r.ip_error_var:>10.5f} {r.ip_upper_bound:>9.5f} {r.ip_bias:>+9.4f}"
            )
        return "\n".join(lines)


def random_unit_vectors(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=generator)
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def measure_distortion(head_dim: int = 128, bits: tuple[int, ...] = (1, 2, 3, 4), num_vectors: int = 20_000, seed: int = 0,
                       trellis: bool = False) -> DistortionResult:
    """Measure both quantizers at each bit width on `num_vectors` random unit vectors of R^head_dim; `trellis`
    adds TurboQuant_mse with trellis codes (`tqpatch.trellis`) at the widths they exist for (1–6 bits)."""
    generator = torch.Generator().manual_seed(seed)
    x = random_unit_vectors(num_vectors, head_dim, generator)
    queries = random_unit_vectors(num_vectors, head_dim, generator)
    exact = (x * queries).sum(-1)
    rows = []
    for b in bits:
        methods = {"mse": TurboQuantMSE, "prod": TurboQuantProd}
        if trellis and b in TRELLIS_BITS:
            methods["trellis"] = functools.partial(TurboQuantMSE, trellis=True)
        for method, make in methods.items():
            quantizer = make(head_dim, b, seed=seed, norm_dtype=torch.float32)
            x_hat = quantizer.dequantize(quantizer.quantize(x))
            err = (x_hat * queries).sum(-1) - exact
            rows.append(
                DistortionRow(
                    method=method,
                    bits=b,
                    mse=((x - x_hat) ** 2).sum(-1).mean().item(),
                    ip_error_var=(err**2).mean().item() * head_dim,
                    ip_bias=err.mean().item() * math.sqrt(head_dim),
                    mse_upper_bound=UPPER_CONSTANT * 4.0**-b,
                    mse_lower_bound=4.0**-b,
                    ip_upper_bound=math.sqrt(3) * math.pi**2 * 4.0**-b,
                )
            )
    return DistortionResult(head_dim=head_dim, num_vectors=num_vectors, seed=seed, rows=rows)


def plot_distortion(result: DistortionResult, path: Path) -> Path:
    """Two panels (MSE, inner-product error) on a log scale against the paper's bounds."""
    plt = pyplot()

    bits = sorted({r.bits for r in result.rows})
    lower = [4.0**-b for b in bits]
    upper = {"mse": [UPPER_CONSTANT * 4.0**-b for b in bits], "ip_error_var": [math.sqrt(3) * math.pi**2 * 4.0**-b for b in bits]}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "mse", "MSE  E‖x − x̃‖²"), (axes[1], "ip_error_var", "inner product  d·E(⟨q,x⟩ − ⟨q,x̃⟩)²")):
        for method, marker, label in (("mse", "o", "TurboQuant_mse"), ("prod", "s", "TurboQuant_prod"), ("trellis", "^", "TurboQuant_mse, trellis codes")):
            points = [(r.bits, getattr(r, key)) for r in result.rows if r.method == method]
            if points:
                ax.semilogy(*zip(*points), marker=marker, label=label)
        ax.semilogy(bits, upper[key], "k--", label="upper bound " + ("(√3π/2)·4^-b" if key == "mse" else "√3π²·4^-b (prod)"))
        ax.semilogy(bits, lower, "k:", label="lower bound 4^-b")
        ax.set_xlabel("bits per coordinate")
        ax.set_title(title)
        ax.set_xticks(bits)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"TurboQuant distortion, d = {result.head_dim}, {result.num_vectors} unit vectors")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def write_distortion(result: DistortionResult, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"distortion_d{result.head_dim}.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2))
    png_path = plot_distortion(result, out_dir / f"distortion_d{result.head_dim}.png")
    return {"json": json_path, "png": png_path}

"""Weight sharing by k-means clustering (Han, Mao & Dally 2016, "Deep Compression", section 3): the weights of a
Linear (or of each group of its rows) are replaced by 2^b shared values, stored as a float16 codebook plus one b-bit
index per weight.

The clustering is 1-D Lloyd iteration, batched over codebooks and run on the sorted values: in 1-D a
nearest-centroid cluster is a run of sorted values between two midpoints, so with prefix sums of the weights and
weighted values each round is a binary search per midpoint plus O(k) arithmetic, whatever the number of weights
(the sort is paid once). Centroids start at the quantiles of p^(1/3) (`initial_centroids`: deterministic and close
to the optimum already; Deep Compression's "linear" start, evenly over [min, max], and plain quantiles both leave
Lloyd far from it at 6–8 bits). With per-value weights a the objective is Σ a (w − c)² — e.g. a = ‖X_j‖², the
energy of the input channel j the weight multiplies, so levels go where the layer output is most sensitive. Both
steps of a round can only lower the objective, so it never rises. Exact zeros (a pruned model) are clustered with
the rest and need not stay zero: Deep Compression clusters only the weights its pruning kept.

The share stage stores the result packed (codebook.py: float16 codebooks + b-bit indices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# where a Linear keeps its codebook and indices until the share stage packs it into a CodebookLinear
CODEBOOK_ATTRIBUTE = "slimlm_codebook"


@dataclass
class SharedCodebook:
    """A weight matrix as shared values: codebook float16 [codebooks, 2^b]; indices uint8 [out, in]; each codebook
    serves out/codebooks consecutive rows."""

    codebook: torch.Tensor
    indices: torch.Tensor
    bits: int

    @property
    def rows_per_codebook(self) -> int:
        return self.indices.shape[0] // self.codebook.shape[0]

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix codebook[indices]."""
        rows = self.codebook.float().repeat_interleave(self.rows_per_codebook, dim=0)
        return rows.gather(1, self.indices.long())

    def packed_bytes(self) -> int:
        """float16 codebooks plus b bits per index, rounded up to whole bytes for the tensor."""
        return self.codebook.numel() * 2 + math.ceil(self.indices.numel() * self.bits / 8)


@dataclass
class SortedValues:
    """The values of each codebook [G, N], sorted, with float64 prefix sums of their weights a and of a·w: any
    cluster (a run of sorted values) then has its mass and mean in O(1), so a Lloyd round costs O(k log N)."""

    values: torch.Tensor  # [G, N] float32, ascending
    mass: torch.Tensor  # [G, N + 1] Σ a over the first i values
    moment: torch.Tensor  # [G, N + 1] Σ a·w over the first i values
    energy: torch.Tensor  # [G] Σ a·w²

    @classmethod
    def of(cls, values: torch.Tensor, weights: torch.Tensor) -> SortedValues:
        ordered, order = values.float().sort(dim=1)
        weights = weights.gather(1, order).double()
        zero = torch.zeros(values.shape[0], 1, dtype=torch.float64, device=values.device)
        mass = torch.cat([zero, weights.cumsum(dim=1)], dim=1)
        moment = torch.cat([zero, (weights * ordered).cumsum(dim=1)], dim=1)
        return cls(ordered, mass, moment, (weights * ordered.double().pow(2)).sum(dim=1))

    def cluster_bounds(self, centroids: torch.Tensor) -> torch.Tensor:
        """[G, k + 1] positions in the sorted values where each nearest-centroid cluster starts (and the end);
        a value on a midpoint goes to the lower centroid, as `assign`."""
        midpoints = ((centroids[:, 1:] + centroids[:, :-1]) / 2).float().contiguous()
        ends = torch.searchsorted(self.values, midpoints, right=True)
        edge = torch.full_like(ends[:, :1], self.values.shape[1])
        return torch.cat([torch.zeros_like(edge), ends, edge], dim=1)

    def cluster_sums(self, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ a and Σ a·w of every cluster [G, k]."""
        mass = self.mass.gather(1, bounds[:, 1:]) - self.mass.gather(1, bounds[:, :-1])
        moment = self.moment.gather(1, bounds[:, 1:]) - self.moment.gather(1, bounds[:, :-1])
        return mass, moment

    def error(self, centroids: torch.Tensor) -> float:
        """Σ a (w − c)² / Σ a with every value on its nearest centroid: Σ a·w² − Σ_k (2 c_k T_k − c_k² M_k)."""
        mass, moment = self.cluster_sums(self.cluster_bounds(centroids))
        c = centroids.double()
        return float((self.energy.sum() - (2 * c * moment - c * c * mass).sum()) / self.mass[:, -1].sum())


def initial_centroids(data: SortedValues, clusters: int, chunks: int = 4096) -> torch.Tensor:
    """k sorted starting centroids [G, k], deterministic: the quantiles at (i + ½)/k of the measure p^(1/3), p the
    (weighted) density of the values — the point density of the optimal fixed-rate quantizer at high resolution
    (Panter & Dite 1951; Gersho & Gray, "Vector Quantization and Signal Compression", 6.3). Plain quantiles of p
    crowd the levels into the bulk and Lloyd takes hundreds of rounds to spread them at 6–8 bits; this starts
    near the optimum. p is estimated per run of N/chunks (at least 8) sorted values: mass m over width Δ, measure
    m^⅓·Δ^⅔."""
    groups, count = data.values.shape
    chunks = min(chunks, max(count // 8, 1))
    edges = torch.linspace(0, count, chunks + 1, device=data.values.device).round().long().expand(groups, -1)
    mass = data.mass.gather(1, edges[:, 1:]) - data.mass.gather(1, edges[:, :-1])
    low = data.values.gather(1, edges[:, :-1].clamp(max=count - 1)).double()
    width = data.values.gather(1, edges[:, 1:].clamp(max=count - 1)).double() - low
    measure = mass.clamp(min=0).pow(1 / 3) * width.pow(2 / 3)
    cumulative = measure.cumsum(dim=1)
    levels = (torch.arange(clusters, device=data.values.device, dtype=torch.float64) + 0.5) / clusters
    targets = (levels.unsqueeze(0) * cumulative[:, -1:]).contiguous()
    chunk = torch.searchsorted(cumulative, targets).clamp(max=chunks - 1)
    inside = targets - cumulative.gather(1, chunk) + measure.gather(1, chunk)  # how far into its chunk
    fraction = (inside / measure.gather(1, chunk).clamp(min=torch.finfo(torch.float64).tiny)).clamp(0, 1)
    return (low.gather(1, chunk) + fraction * width.gather(1, chunk)).float()


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted centroids [G, k] for every value [G, N] (ties go to the lower one)."""
    midpoints = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), values.contiguous())


def lloyd(data: SortedValues, centroids: torch.Tensor, iterations: int) -> tuple[torch.Tensor, list[float]]:
    """Up to `iterations` assign/update rounds from sorted `centroids` [G, k]; stops once no value changes cluster.
    Returns the centroids and the weighted MSE after each round (non-increasing: both steps lower it)."""
    history: list[float] = []
    previous = None
    total_mass = data.mass[:, -1].sum()
    for _ in range(iterations):
        bounds = data.cluster_bounds(centroids)
        if previous is not None and torch.equal(bounds, previous):
            break
        mass, moment = data.cluster_sums(bounds)
        filled = mass > 0  # an empty cluster keeps its centroid
        means = torch.where(filled, moment / mass.clamp(min=torch.finfo(mass.dtype).tiny), centroids.double())
        # after the update the error is Σ a·w² − Σ_k T_k²/M_k (each centroid at its cluster's mean)
        history.append(float((data.energy.sum() - (moment * means).sum()) / total_mass))
        # sorting keeps the order Lloyd preserves anyway, except for an empty cluster its neighbours moved past
        centroids, previous = means.float().sort(dim=1).values, bounds
    return centroids, history


def cluster_weight(
    weight: torch.Tensor,
    bits: int,
    rows_per_codebook: int | None = None,
    channel_energy: torch.Tensor | None = None,
    iterations: int = 25,
) -> SharedCodebook:
    """k-means of a matrix [out, in] to 2^b shared values, one codebook per `rows_per_codebook` rows (None: one for
    the whole matrix). `channel_energy` [in] weights each value's squared error by its input channel (None: equal)."""
    rows = weight.shape[0] if rows_per_codebook is None else rows_per_codebook
    values = weight.detach().float().reshape(weight.shape[0] // rows, -1)
    energy = torch.ones(weight.shape[1], device=weight.device) if channel_energy is None else channel_energy.float()
    data = SortedValues.of(values, energy.to(values.device).expand(weight.shape).reshape(values.shape))
    centroids, _ = lloyd(data, initial_centroids(data, 2**bits), iterations)
    del data
    # the codebook is stored in float16: indices are chosen against the stored values, not the float32 ones
    codebook = centroids.half().sort(dim=1).values
    indices = assign(values, codebook.float())
    return SharedCodebook(codebook, indices.reshape(weight.shape).to(torch.uint8), bits)


def store_codebook(linears: list[nn.Linear], codes: SharedCodebook) -> None:
    """Write codebook[indices] into the (shared) weight in its dtype and keep the codes on every Linear using it."""
    linears[0].weight.data.copy_(codes.dequantize().to(linears[0].weight.dtype))
    for linear in linears:
        setattr(linear, CODEBOOK_ATTRIBUTE, codes)

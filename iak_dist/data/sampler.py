"""Dynamic batch-aware domain sampler: every domain fine-tunes in one job, none is drowned.

Each row of a batch picks its domain with probability `p_d ∝ n_d ** alpha` (alpha = 1: as in the
data, alpha = 0: uniform; `DomainPicks`), then takes the domain's next row: here from a per-domain
shuffled order of an in-memory table's rows (`DomainBatchSampler`, for small tables: tests,
profiling), in the fine-tune phase from a per-domain stream over the rank's share of the split
(`data/domain_streams.py`). Small domains are seen more often than their share but cycle through
their own rows; the loss then averages each domain's mean loss (see `domain_normalised_mean`), so
a batch's gradient is not dominated by whichever domain is largest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def domain_probabilities(counts: np.ndarray, alpha: float) -> np.ndarray:
    """`p_d ∝ n_d ** alpha` over the domains with rows (empty domains get 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.where(counts > 0, np.power(np.maximum(counts, 1.0), alpha), 0.0)
    return weights / weights.sum()


class DomainPicks:
    """The domain of every row of each batch: `p_d ∝ counts_d ** alpha`, seeded, resumable.

    Args:
        counts: rows per domain, shape [K] (a domain with 0 rows is never picked).
        alpha: the exponent of `n_d` (see module docstring).
        batch_size: rows per batch.
        seed: makes the sequence of picks reproducible; `state_dict` captures the position.
    """

    def __init__(self, counts: np.ndarray, alpha: float, batch_size: int, seed: int) -> None:
        if np.sum(counts) == 0:
            raise ValueError("no rows with a known domain to sample from")
        self.probs = domain_probabilities(counts, alpha)
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)

    def next_batch(self) -> list[tuple[int, int]]:
        """`(domain, rows)` for each domain picked in the next batch, in domain order.

        A batch's rows come grouped by domain in this order (its rows are exchangeable: the loss averages
        each domain's mean), so the per-domain kernels read each domain's rows where they lie
        (`model.strategies.base.DomainRows`) instead of gathering and scattering them every step."""
        picks = self._rng.choice(len(self.probs), size=self.batch_size, p=self.probs)
        counts = np.bincount(picks, minlength=len(self.probs))
        return [(int(d), int(counts[d])) for d in np.flatnonzero(counts)]

    def state_dict(self) -> dict[str, Any]:
        return self._rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state


class DomainBatchSampler:
    """Yields batches of row indices of an in-memory table drawn across domains (`DomainPicks`).

    Args:
        domains: domain index of every row, shape [N].
        num_domains: K; rows with domain outside [0, K) are never sampled.
        batch_size: rows per batch.
        alpha: the exponent of `n_d` (see module docstring).
        seed: makes the sequence of batches reproducible; `state_dict` captures the position.
    """

    def __init__(self, domains: np.ndarray, num_domains: int, batch_size: int, alpha: float, seed: int) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.rows = [np.flatnonzero(domains == d) for d in range(num_domains)]
        self.counts = np.array([len(r) for r in self.rows])
        self.picks = DomainPicks(self.counts, alpha, batch_size, seed)
        self.probs = self.picks.probs
        self._order = [self._perm(d, 0) for d in range(num_domains)]
        self._pos = np.zeros(num_domains, dtype=np.int64)
        self._round = np.zeros(num_domains, dtype=np.int64)

    def _perm(self, domain: int, round_: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, domain, round_])
        return self.rows[domain][rng.permutation(len(self.rows[domain]))]

    def next_batch(self) -> np.ndarray:
        """The next batch's row indices, grouped by domain (`DomainPicks.next_batch`)."""
        return np.concatenate([self._take(d, n) for d, n in self.picks.next_batch()])

    def _take(self, d: int, n: int) -> np.ndarray:
        taken = []
        while n > 0:
            order = self._order[d]
            k = min(n, len(order) - int(self._pos[d]))
            taken.append(order[self._pos[d]:self._pos[d] + k])
            self._pos[d] += k
            n -= k
            if self._pos[d] == len(order):
                self._round[d] += 1
                self._pos[d] = 0
                self._order[d] = self._perm(d, int(self._round[d]))
        return np.concatenate(taken)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.picks.state_dict(), "pos": self._pos.tolist(), "round": self._round.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.picks.load_state_dict(state["rng"])
        self._pos = np.array(state["pos"], dtype=np.int64)
        self._round = np.array(state["round"], dtype=np.int64)
        self._order = [self._perm(d, int(r)) for d, r in enumerate(self._round)]


def domain_normalised_mean(per_row: torch.Tensor, domain: torch.Tensor, num_domains: int) -> torch.Tensor:
    """Mean over the domains present in the batch of each domain's mean loss.

    Every shape here is fixed by `num_domains`: no `bincount` (its output size is data-dependent)
    and no boolean-mask indexing (a `nonzero`), each of which is a host sync per step on CUDA.
    """
    idx = domain.clamp(min=0)
    sums = per_row.new_zeros(num_domains).index_add(0, idx, per_row)
    counts = per_row.new_zeros(num_domains).index_add(0, idx, torch.ones_like(per_row))
    present = (counts > 0).to(per_row.dtype)
    return (sums / counts.clamp(min=1)).sum() / present.sum()

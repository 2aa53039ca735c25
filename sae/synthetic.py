"""Synthetic activations from a known sparse, overcomplete dictionary (features in superposition).

Generative model (the data of benchmarks/train_bench.py; the setting of Sharkey, Braun
and Millidge 2022, "Taking features out of superposition with sparse autoencoders", and of the
toy models of Elhage et al. 2022). With n_features > d unit ground-truth directions g_i ∈ R^d:

    x = s · ( c · Σ_{i ∈ A} a_i g_i  +  μ  +  ε )              x ∈ R^d

- A, the active set of one token: k_candidates distinct features drawn without replacement with
  Zipf-like probabilities p_i ∝ (i + 1)^(-α), each kept independently with probability keep_prob,
  so E|A| = k_candidates · keep_prob (the true mean L0). Drawing without replacement is done with
  the Gumbel-top-k trick (Kool, van Hoof and Welling 2019): the top k of log p_i + Gumbel noise.
- a_i = magnitude_min + magnitude_scale · Exp(1), a positive magnitude.
- μ: a fixed offset (random direction), ε ~ N(0, σ² I): isotropic noise. `mean_fraction` and
  `noise_fraction` are their approximate shares of E‖x‖² (c, ‖μ‖ and σ are set from them).
- s: a global scale making E‖x‖² = d, estimated once on a calibration sample (so SAE inputs have
  the same scale as normalised activations).

Determinism and streaming. Token t of stream j is a pure function of (seed, j, t): tokens are made
in blocks of `BLOCK` tokens, block b from its own generator seeded by (seed, j, b). So the data do
not depend on the batch size, any batch can be produced without producing the ones before it
(`batches(batch_size, start_step=...)` is what a resumed training run needs), and memory stays
bounded by one batch. Use stream 0 for training and another stream for held-out evaluation: same
ground truth, different tokens.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SyntheticActivations", "BLOCK"]

BLOCK = 1024  # tokens generated per seeded block

# Purposes mixed into every seed, so the dictionary, the calibration sample and the token
# streams never share random numbers.
_DICTIONARY, _CALIBRATION, _TOKENS = 0, 1, 2


def _generator(*entropy: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


class SyntheticActivations:
    """A deterministic stream of activations with a known sparse ground-truth dictionary.

    Attributes:
        directions: [n_features, d] ground-truth unit directions, rows sorted by firing
            probability (row 0 fires most often).
        probabilities: [n_features] the Zipf weights p_i (sum 1) used to draw candidates.
        mean_offset: [d] the fixed offset s·μ present in every token.
        scale: the global factor s (E‖x‖² = d).
        expected_l0: k_candidates · keep_prob, the true mean number of active features.

    Example:
        data = SyntheticActivations(d=64, n_features=256, k_candidates=8, seed=0)
        x = data.sample(4096)                              # [4096, 64]
        it = data.batches(1024, start_step=3)              # batches 3, 4, ... of stream 0
        train(sae, data.stream(1024), cfg)                 # resumable stream for sae.training
    """

    def __init__(
        self,
        d: int = 576,
        n_features: int = 2048,
        k_candidates: int = 32,
        keep_prob: float = 0.5,
        zipf_exponent: float = 0.7,
        magnitude_min: float = 0.5,
        magnitude_scale: float = 1.0,
        mean_fraction: float = 0.1,
        noise_fraction: float = 0.0025,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        calibration_tokens: int = 16 * BLOCK,
    ):
        if d <= 0 or n_features <= 0:
            raise ValueError(f"d and n_features must be positive, got d={d}, n_features={n_features}")
        if not 0 < k_candidates <= n_features:
            raise ValueError(f"k_candidates must be in [1, n_features={n_features}], got {k_candidates}")
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}")
        if mean_fraction < 0 or noise_fraction < 0 or mean_fraction + noise_fraction >= 1:
            raise ValueError("mean_fraction and noise_fraction must be >= 0 with a sum < 1, got "
                             f"{mean_fraction} and {noise_fraction}")
        if magnitude_min < 0 or magnitude_scale < 0 or magnitude_min + magnitude_scale == 0:
            raise ValueError("magnitudes must be non-negative and not all zero")
        self.d, self.n_features, self.k_candidates = int(d), int(n_features), int(k_candidates)
        self.keep_prob, self.zipf_exponent = float(keep_prob), float(zipf_exponent)
        self.magnitude_min, self.magnitude_scale = float(magnitude_min), float(magnitude_scale)
        self.mean_fraction, self.noise_fraction = float(mean_fraction), float(noise_fraction)
        self.seed, self.dtype = int(seed), dtype
        self.expected_l0 = self.k_candidates * self.keep_prob

        g = _generator(self.seed, _DICTIONARY)
        self.directions = F.normalize(torch.randn(self.n_features, self.d, generator=g), dim=1)  # [n, d]
        mu_dir = F.normalize(torch.randn(self.d, generator=g), dim=0)                          # [d]
        ranks = torch.arange(1, self.n_features + 1, dtype=torch.float64)
        p = ranks.pow(-self.zipf_exponent)
        self.probabilities = (p / p.sum()).float()                                              # [n]
        self._log_p = self.probabilities.log()

        # Component scales: the sparse part gets the energy share 1 - mean - noise, then one global
        # factor corrects for the cross term <μ, E sparse> so that E‖x‖² = d exactly (in expectation).
        self._c, self._mu, self._sigma, self.scale = 1.0, torch.zeros(self.d), 0.0, 1.0
        cal = _generator(self.seed, _CALIBRATION)
        sparse, _, _ = self._sparse_part(calibration_tokens, cal)
        sparse_energy = sparse.pow(2).sum(1).mean().item()
        self._c = math.sqrt((1 - mean_fraction - noise_fraction) * self.d / sparse_energy)
        self._mu = mu_dir * math.sqrt(mean_fraction * self.d)
        self._sigma = math.sqrt(noise_fraction)
        raw = self._c * sparse + self._mu + self._sigma * torch.randn(sparse.shape, generator=cal)
        self.scale = math.sqrt(self.d / raw.pow(2).sum(1).mean().item())
        self.mean_offset = (self.scale * self._mu).to(dtype)

    # --- generation ----------------------------------------------------------------------
    def _sparse_part(self, n: int, g: torch.Generator):
        """Unscaled Σ_{i∈A} a_i g_i for n tokens: ([n, d], indices [n, kc], magnitudes [n, kc])."""
        u = torch.rand(n, self.n_features, generator=g).clamp_(min=1e-20)
        keys = self._log_p - (-u.log()).log()                        # log p_i + Gumbel  [n, n_features]
        idx = keys.topk(self.k_candidates, dim=1).indices            # [n, kc] distinct features
        keep = torch.rand(n, self.k_candidates, generator=g) < self.keep_prob
        expo = -torch.rand(n, self.k_candidates, generator=g).clamp_(min=1e-20).log()
        mags = (self.magnitude_min + self.magnitude_scale * expo) * keep  # [n, kc], 0 if dropped
        sparse = F.embedding_bag(idx, self.directions, per_sample_weights=mags, mode="sum")  # [n, d]
        return sparse, idx, mags

    def _block(self, stream: int, b: int, with_codes: bool = False):
        g = _generator(self.seed, _TOKENS, stream, b)
        sparse, idx, mags = self._sparse_part(BLOCK, g)
        x = self._c * sparse + self._mu + self._sigma * torch.randn(BLOCK, self.d, generator=g)
        x = (self.scale * x).to(self.dtype)                           # [BLOCK, d]
        if with_codes:
            return x, idx, (self.scale * self._c * mags).to(self.dtype)
        return x

    def _token_chunks(self, start: int, stream: int, with_codes: bool) -> Iterator:
        """Chunks of consecutive tokens of `stream` from token `start` on (endless)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        b, offset = divmod(start, BLOCK)
        while True:
            out = self._block(stream, b, with_codes)
            yield tuple(t[offset:] for t in out) if with_codes else out[offset:]
            b, offset = b + 1, 0

    def batches(self, batch_size: int, start_step: int = 0, stream: int = 0,
                n_batches: int | None = None) -> Iterator[torch.Tensor]:
        """Batches [batch_size, d] of `stream`; the first one is batch number `start_step`
        (tokens start_step·batch_size onwards). Endless unless `n_batches` is given."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        chunks = self._token_chunks(start_step * batch_size, stream, with_codes=False)
        pending: list[torch.Tensor] = []
        have, made = 0, 0
        while n_batches is None or made < n_batches:
            while have < batch_size:
                c = next(chunks)
                pending.append(c)
                have += len(c)
            cat = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield cat[:batch_size].clone()
            rest = cat[batch_size:]
            pending, have, made = ([rest] if len(rest) else []), len(rest), made + 1

    def stream(self, batch_size: int, stream: int = 0) -> Callable[[int], Iterator[torch.Tensor]]:
        """A resumable data stream for `sae.training.train`: start_step -> iterator of batches."""
        return lambda start_step: self.batches(batch_size, start_step=start_step, stream=stream)

    def sample(self, n: int, start: int = 0, stream: int = 0, return_codes: bool = False):
        """Materialise tokens start .. start+n-1 of `stream` as x [n, d].

        With return_codes, also return the ground truth per token: indices [n, k_candidates] into
        `directions` and magnitudes [n, k_candidates] (0 where the candidate was dropped), so that
        x = Σ_j magnitudes[:, j] · directions[indices[:, j]] + mean_offset + noise."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        xs, idxs, mags, have = [], [], [], 0
        chunks = self._token_chunks(start, stream, with_codes=return_codes)
        while have < n:
            chunk = next(chunks)
            parts = chunk if return_codes else (chunk,)
            take = min(len(parts[0]), n - have)
            xs.append(parts[0][:take])
            if return_codes:
                idxs.append(parts[1][:take])
                mags.append(parts[2][:take])
            have += take
        x = torch.cat(xs) if xs else torch.empty(0, self.d, dtype=self.dtype)
        if not return_codes:
            return x
        if not xs:
            return x, torch.empty(0, self.k_candidates, dtype=torch.long), torch.empty(0, self.k_candidates)
        return x, torch.cat(idxs), torch.cat(mags)

    def __repr__(self) -> str:
        return (f"SyntheticActivations(d={self.d}, n_features={self.n_features}, "
                f"k_candidates={self.k_candidates}, keep_prob={self.keep_prob}, "
                f"expected_l0={self.expected_l0:g}, seed={self.seed})")

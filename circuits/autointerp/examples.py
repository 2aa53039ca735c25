"""What autointerp and dashboards know about one feature: windows of text and how it fired.

A feature i of a dictionary at a site has an activation c_t = encode(x_t)[i] at every real token t
of a corpus. The latent cache (`circuits.autointerp.cache`) cuts the corpus into windows of W
tokens (default 32, as delphi's `example_ctx_len`, Paulo et al. 2024) and keeps, per feature:

    top            the windows with the largest max_t c_t, strongest first
    quantiles      activating windows binned by max activation into equal-count bins
                   (deciles by default), lowest bin first (Paulo et al. 2024, "quantiles")
    random         activating windows drawn uniformly (Cunningham et al. 2023's "random" split)
    negatives      random windows where c_t = 0 at every position
    hard_negatives non-activating windows nearest in sentence embedding to the activating ones
                   (contrastive negatives; all-MiniLM-L6-v2, as delphi's FAISS option)

plus firing statistics over all N real tokens of the corpus. Every window carries the feature's
activation at each of its tokens, so any scorer can mark tokens or correlate activations.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Window:
    """W consecutive tokens of one corpus context and the feature's activation at each."""

    tokens: tuple[int, ...]   # [W] token ids
    acts: tuple[float, ...]   # [W] c_t of this feature (0.0 where it did not fire)
    row: int                  # context index in the corpus
    start: int                # position of tokens[0] in that context

    @property
    def max_act(self) -> float:
        return max(self.acts) if self.acts else 0.0


@dataclass
class FeatureExamples:
    """Everything the cache keeps about feature `feature` of the dictionary at `site`."""

    site: str
    feature: int
    top: list[Window] = field(default_factory=list)
    quantiles: list[list[Window]] = field(default_factory=list)
    random: list[Window] = field(default_factory=list)
    negatives: list[Window] = field(default_factory=list)
    hard_negatives: list[Window] = field(default_factory=list)
    n_tokens: int = 0               # real tokens seen (N)
    density: float = 0.0            # #{t : c_t > 0} / N
    max_act: float = 0.0            # max_t c_t
    mean_active: float = 0.0        # mean of c_t where c_t > 0
    hist_edges: list[float] = field(default_factory=list)   # [B + 1] bins of the nonzero c_t
    hist_counts: list[int] = field(default_factory=list)    # [B] token counts per bin
    correlated: list[tuple[int, float]] = field(default_factory=list)  # (feature, Pearson r), strongest first

    @property
    def activating(self) -> list[Window]:
        """All distinct activating windows the cache kept (top, quantiles, random)."""
        seen, out = set(), []
        for w in [*self.top, *(w for q in self.quantiles for w in q), *self.random]:
            if (w.row, w.start) not in seen:
                seen.add((w.row, w.start))
                out.append(w)
        return out


def token_strings(tokenizer, ids) -> list[str]:
    """Each token's own text (leading spaces kept; partial UTF-8 bytes decode to U+FFFD)."""
    return [tokenizer.decode([int(i)]) for i in ids]

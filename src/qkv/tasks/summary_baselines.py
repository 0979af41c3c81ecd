"""Three baselines for code-to-text summarization, each a function of the code alone.

* :func:`name_baseline`: the function's name split into words, ``"get_item_count"`` ->
  ``"Get item count"``.
* :class:`Retrieval`: the summary of the most similar training function, by cosine
  similarity of TF-IDF vectors of lower-cased code words (identifiers split, as the model
  reads them).
* :func:`first_line_baseline`: the first line of the body after the docstring.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from .code_corpus import split_words

__all__ = ["Retrieval", "first_line_baseline", "name_baseline"]


def name_baseline(qualified_name: str) -> str:
    """``"Cache.get_item_count"`` -> ``"Get item count"`` (the last name, in words)."""
    words = [w.lower() for w in split_words(qualified_name.rsplit(".", 1)[-1])]
    if not words:
        return qualified_name
    return " ".join([words[0].capitalize(), *words[1:]])


def first_line_baseline(first_line: str) -> str:
    """The first line of the body, as is."""
    return first_line


class Retrieval:
    """Nearest training function by TF-IDF cosine over code words; answers its summary.

    ``idf(w) = log((1 + N) / (1 + df(w))) + 1`` (smoothed, as scikit-learn's default);
    term frequencies are raw counts; vectors are L2-normalised. Ties go to the earliest
    training pair.
    """

    def __init__(self, sources: Sequence[str], targets: Sequence[str]) -> None:
        if len(sources) != len(targets) or not sources:
            raise ValueError(f"need as many targets as sources, at least one; got "
                             f"{len(sources)} sources and {len(targets)} targets")
        self.targets = list(targets)
        docs = [Counter(s.lower().split()) for s in sources]
        df: Counter = Counter()
        for d in docs:
            df.update(d.keys())
        self.vocab = {w: i for i, w in enumerate(sorted(df))}
        n = len(docs)
        self.idf = torch.tensor([math.log((1 + n) / (1 + df[w])) + 1 for w in sorted(df)],
                                dtype=torch.float32)  # (V,)
        self.matrix = self._vectors(docs)  # (N, V) sparse, rows of unit length

    def _vectors(self, docs: list[Counter]) -> torch.Tensor:
        rows, cols, vals = [], [], []
        for r, d in enumerate(docs):
            for w, c in d.items():
                j = self.vocab.get(w)
                if j is not None:
                    rows.append(r)
                    cols.append(j)
                    vals.append(c * float(self.idf[j]))
        idx = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
        val = torch.tensor(vals, dtype=torch.float32)
        norms = torch.zeros(len(docs)).index_add_(0, idx[0], val * val).sqrt()  # (N,)
        val = val / norms[idx[0]].clamp_min(1e-12)
        return torch.sparse_coo_tensor(idx, val, (len(docs), len(self.vocab)),
                                       check_invariants=False).coalesce()

    def nearest(self, sources: Sequence[str], *, chunk: int = 256) -> list[int]:
        """Index of the most similar training function for each of ``sources``."""
        out: list[int] = []
        for i in range(0, len(sources), chunk):
            q = self._vectors([Counter(s.lower().split()) for s in sources[i : i + chunk]])
            sims = torch.sparse.mm(self.matrix, q.to_dense().T)  # (N, chunk)
            out.extend(sims.argmax(dim=0).tolist())
        return out

    def __call__(self, sources: Sequence[str]) -> list[str]:
        """The summaries of the nearest training functions."""
        return [self.targets[j] for j in self.nearest(sources)]

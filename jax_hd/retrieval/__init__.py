"""Retrieval for search-augmented rollouts: BM25, dense index, Search-R1-compatible HTTP service and client.

Every retriever implements `Retriever`; the rollout only sees `client.SearchClient`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class Passage:
    """One retrieved passage. `contents` follows Search-R1's corpus convention: `"<title>"\\n<text>`."""

    id: str
    contents: str
    score: float


class Retriever(Protocol):
    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """The `topk` best passages for each query, best first."""
        ...

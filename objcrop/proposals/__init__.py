"""Object proposals: backends (``image -> boxes, scores``), the memory-mapped :class:`ProposalStore`
and the builder that fills it."""

from __future__ import annotations

from objcrop.proposals.backends import BACKENDS, GT, MissingDependencyError, backend_names, make_proposer
from objcrop.proposals.store import IncompleteStoreError, ProposalStore, StaleStoreError

__all__ = [
    "BACKENDS",
    "GT",
    "IncompleteStoreError",
    "MissingDependencyError",
    "ProposalStore",
    "StaleStoreError",
    "backend_names",
    "make_proposer",
    "open_proposals",
]


def open_proposals(spec: str, records) -> ProposalStore:
    """The proposals of ``records``: ``"gt"`` gives the GT boxes (largest first, in memory), any
    other value is a store folder, opened and checked against ``records``; a folder named ``gt``
    is reached as ``./gt``."""
    if spec == GT:
        return ProposalStore.from_records(records)
    return ProposalStore.open(spec, records)

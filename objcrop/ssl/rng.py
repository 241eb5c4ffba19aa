"""Process-wide random state for exact resumption: seeding, saving and restoring the global generators.

objcrop itself draws from explicit generators (every sample is a function of seed, epoch and index);
the global torch, numpy and Python generators are seeded and checkpointed for third-party code and for
what torch draws from them (shuffle-BN permutations, dropout).
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch

__all__ = ["loader_generator", "rng_state", "seed_globals", "set_rng_state"]


def seed_globals(seed: int) -> None:
    """Seeds the global torch, numpy and Python generators with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (for third-party code; objcrop uses explicit generators)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's global RNG states as tensors and strings (loadable with ``weights_only=True``)."""
    _, numpy_key, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(numpy_key.astype(np.int64)),
        "numpy_pos": int(numpy_pos),
        "numpy_gauss": [int(numpy_has_gauss), float(numpy_gauss)],
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned (CUDA states only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    has_gauss, gauss = state["numpy_gauss"]
    numpy_key = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", numpy_key, state["numpy_pos"], has_gauss, gauss))  # noqa: NPY002
    version, internal, gauss_next = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The DataLoader's own generator: without one, every new iterator draws its worker base seed from
    the global torch generator, which a mid-epoch resume would then leave in a different state
    (and shuffle-BN draws its permutations from that generator)."""
    (value,) = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(value))

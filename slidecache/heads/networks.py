"""The attention-MIL networks by name, beside GatedABMIL: what `evaluate --head NAME` trains and a saved head
rebuilds. Importing this module needs no torch (the pooled-feature heads' workers list the names); building a
network does. Each keeps slidecache/heads/mil.py's contract."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slidecache.errors import EvaluationError

if TYPE_CHECKING:
    from slidecache.heads.mil import MILNetwork

# abmil: Ilse et al. 2018; transmil: Shao et al. 2021; clam-sb: Lu et al. 2021; dsmil: Li et al. 2021.
ARCHITECTURES = ("abmil", "transmil", "clam-sb", "dsmil")


def network_class(architecture: str) -> type[MILNetwork]:
    from slidecache.heads.abmil import GatedABMIL
    from slidecache.heads.clam import CLAMSB
    from slidecache.heads.dsmil import DSMIL
    from slidecache.heads.transmil import TransMIL

    classes = {c.architecture: c for c in (GatedABMIL, TransMIL, CLAMSB, DSMIL)}
    if architecture not in classes:
        raise EvaluationError(f"unknown MIL network {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    return classes[architecture]


def build_network(architecture: str, dim: int, n_out: int, hidden: int = 128, dropout: float = 0.25,
                  **options: Any) -> MILNetwork:
    """The network; `options` may hold any training settings: it takes the ones it names (CLAM's instance loss)."""
    cls = network_class(architecture)
    return cls(dim, n_out, hidden, dropout, **{k: v for k, v in options.items() if k in cls.options})

"""Recording: models, corpora, the recording loop, the store schema and its reader.

`from engine import open_store` opens a recorded run; see engine.store for the record types.
"""

from engine.errors import UserError

__all__ = ["open_store", "ActivationRecord", "NeuronRecord", "UserError"]


def __getattr__(name):  # keep `import engine` light: zarr/numpy load on first use
    if name in ("open_store", "ActivationRecord", "NeuronRecord", "NeuronId", "Store", "SPLITS"):
        from engine import store

        return getattr(store, name)
    raise AttributeError(name)

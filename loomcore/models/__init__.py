"""LoomVideo's models. `LoomDiT` (dit.py) is imported lazily: `from loomcore.models import LoomDiT`."""


def __getattr__(name):
    if name == "LoomDiT":
        from .dit import LoomDiT

        return LoomDiT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

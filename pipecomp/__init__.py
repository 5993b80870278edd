"""pipecomp: compile image networks into pipelined, multi-rate video networks."""
from .compiler import compile
from .errors import CompileError
from .plan import Plan
from .schedule import Placement, schedule
from .videonet import VideoNet

# `visualize` is there too, loaded on first use (it needs graphviz), so not in __all__.
__all__ = ["compile", "CompileError", "Plan", "Placement", "VideoNet", "schedule"]
__version__ = "0.1.0"


def __getattr__(name):
    # Pictures need the optional graphviz package: import it only when asked for.
    if name == "visualize":
        from .viz import visualize
        return visualize
    raise AttributeError(f"module 'pipecomp' has no attribute {name!r}")

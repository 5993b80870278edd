"""pipecomp: compile image networks into pipelined, multi-rate video networks."""
from .compiler import compile
from .errors import CompileError
from .plan import Plan
from .videonet import VideoNet

__all__ = ["compile", "CompileError", "Plan", "VideoNet"]
__version__ = "0.1.0"

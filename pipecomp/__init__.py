"""pipecomp: compile image networks into pipelined, multi-rate video networks."""
from .compiler import compile
from .errors import CompileError
from .plan import Plan
from .schedule import Placement, schedule
from .videonet import VideoNet

__all__ = ["compile", "CompileError", "Plan", "Placement", "VideoNet", "schedule"]
__version__ = "0.1.0"

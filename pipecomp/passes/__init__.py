"""Compilation passes, one idea each; each takes a plan and returns a new one (style §2)."""
from .clocks import assign_clocks
from .delays import assign_delays
from .feedback import add_feedback
from .partition import partition
from .phases import PHASES, assign_phases
from .shift import insert_shifts
from .skips import add_skips
from .state import allocate_state
from .temporal import add_temporal

__all__ = ["insert_shifts", "assign_clocks", "partition", "assign_delays", "assign_phases",
           "allocate_state", "add_temporal", "add_skips", "add_feedback", "PHASES"]

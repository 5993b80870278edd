"""TVM backend: a compiled video network as TVM modules, for this machine or a board (semantics §7).

`build(net, target)` compiles every stage variant into a Relax module and returns a
`Program` that steps like `net`; `Program.export(folder)` writes the libraries and a
manifest, and `load(folder)` (or `python3 folder/run.py folder`, with only tvm and numpy)
runs them. Needs Apache TVM 0.27: pip install 'pipecomp[tvm]'.
"""
from .compiler import TARGETS, build, resolve_target
from .run import Program, load, validate

__all__ = ["build", "load", "validate", "resolve_target", "Program", "TARGETS"]

"""`python -m pipecomp`: the command line (see `pipecomp.cli`)."""
from .cli import main

raise SystemExit(main())

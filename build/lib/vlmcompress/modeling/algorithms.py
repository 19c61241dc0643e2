"""The token-reduction algorithms this modeling code can rebuild: importing this file registers their reducers.

Each algorithm is one flat file here (kernels + reducer, registered by one `register_reducer` call at its end). In a
saved checkpoint this file is rewritten to import only the algorithm the checkpoint uses (`checkpoint.py`), so a
plug-in algorithm's file travels with it.
"""

from .crossget import REDUCER as CROSSGET  # noqa: F401
from .fastv import REDUCER as FASTV  # noqa: F401
from .prumerge import REDUCER as PRUMERGE  # noqa: F401
from .tome import REDUCER as TOME  # noqa: F401
from .turbo import REDUCER as TURBO  # noqa: F401
from .visionzip import REDUCER as VISIONZIP  # noqa: F401

NAMES = ("tome", "turbo", "crossget", "fastv", "visionzip", "prumerge")

"""`vlmcompress report`: the pictures a user looks at after `vlmcompress apply`.

    from vlmcompress.report import build_report
    result = build_report(["out/tome", "out/prune-tome"], "report/", base="shapes-clip")
    result["points"][0]["accuracy"], result["files"]

writes into `report/`: Pareto plots of accuracy against GFLOPs and against throughput (`pareto_gflops.png/.svg/
.json`, `pareto_throughput.*`), tokens kept per layer per tower (`tokens_per_layer.*`), heads / MLP neurons kept
per layer (`pruning_per_layer.*`), what the token reduction did to a few images (`tokens_<folder>.png/.json`,
`tokens_side_by_side.png`), everything in `report_data.json`, and `index.html` showing it all.

Modules: `collect` (folders → points, JSON and YAML only), `pareto` (the front, pure), `measure` (GFLOPs,
throughput and accuracy the folders lack), `trace` (running a reduced model on images with source tracking),
`layers` (per-layer data), `pictures` (source maps → patch groups → panels), `plots` (charts), `html` (the page),
`build` (the whole). torch and matplotlib are imported inside functions only.
"""

from __future__ import annotations

from .build import build_report
from .pareto import pareto_front

__all__ = ["build_report", "pareto_front"]

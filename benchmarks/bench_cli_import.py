"""Cold-start time of the package face: `import vlmcompress`, `vlmcompress --help`, `list-methods`,
`validate --help` (each a fresh interpreter, median of `--runs`), and whether torch / transformers got imported.

    python benchmarks/bench_cli_import.py --json benchmarks/results/cli_import.json

Goal (the first architecture issue): `--help` under 1 s and `list-methods` under 2 s on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_json  # noqa: E402

CASES = {
    "import vlmcompress": "import vlmcompress",
    "vlmcompress --help": "['--help']",
    "vlmcompress list-methods": "['list-methods']",
    "vlmcompress validate --help": "['validate', '--help']",
}


def command(case: str) -> list[str]:
    body = CASES[case]
    if not body.startswith("["):
        code = body
    else:
        code = (f"import sys; sys.argv = ['vlmcompress', *{body}]\nfrom vlmcompress.cli import main\n"
                "try:\n    main()\nexcept SystemExit:\n    pass")
    code += "\nimport sys\nprint('heavy:', sorted(m for m in ('torch', 'transformers') if m in sys.modules), " \
            "file=sys.stderr)"
    return [sys.executable, "-c", code]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from vlmcompress import cpu

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    results = {"cpu": cpu.detect(with_torch=False).label(), "python": sys.version.split()[0],
               "load_average_1m": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d"),
               "runs": args.runs, "cases": {}}
    for case in CASES:
        times, heavy = [], None
        for _ in range(args.runs):
            start = time.perf_counter()
            done = subprocess.run(command(case), capture_output=True, text=True, env=env)
            times.append(time.perf_counter() - start)
            heavy = done.stderr.strip().splitlines()[-1]
        results["cases"][case] = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                                  "imports": heavy}
    results["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    write_json(results, args.json)


if __name__ == "__main__":
    main()

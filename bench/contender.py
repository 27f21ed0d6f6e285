"""One contender in its own process: `python bench/contender.py NAME SPEC.json RESULT.json`.

The process start is taken before anything heavy is imported, so "time to first step" counts imports,
loading and caching. The result JSON gets the contender's figures plus the peak RSS of this process and of
every process it started and waited for (an accelerate launcher and its trainer, a ComfyUI server).
"""

from __future__ import annotations

import time

STARTED = time.time()

import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import OFFLINE_ENV, Spec, peak_rss_bytes  # noqa: E402

MODULES = {
    "ours": "bench.ours",
    "ours_noflip": "bench.ours",
    "ours_all": "bench.ours",
    "seed": "bench.seed_loop",
    "seed_sdxl": "bench.seed_loop_sdxl",
    "floor": "bench.floor",
    "native": "bench.native",
    "node": "bench.node",
    "probe": "bench.probe",
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in MODULES:
        print(f"usage: contender.py {{{','.join(MODULES)}}} SPEC.json RESULT.json", file=sys.stderr)
        return 2
    name, spec_path, result_path = argv[0], Path(argv[1]), Path(argv[2])
    os.environ.update(OFFLINE_ENV)
    spec = Spec.load(spec_path)
    Path(spec.workdir).mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(MODULES[name])
    result = module.run(spec, STARTED)
    result.update(name=name, resolution=spec.resolution, peak_rss_bytes=peak_rss_bytes(),
                  wall_s=time.time() - STARTED)
    result_path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`fastckpt bench`: fastckpt against Keras, safetensors and the physical floors.

Small files by concept: `models` (synthetic models), `contenders` (the ways to save),
`floors` (memcpy, write+fsync, dd, read), `measure` (interleaving, medians, RSS), one
module per figure (`throughput`, `variables`, `training`, `memory`, `loading`), `targets`
(performance.md's goals as ratios), `report` and `plots` (results.json, results.md, PNGs),
and `runner` (the command). `benches/` reuses the same contenders under pytest-benchmark.
"""

from fastckpt.bench.runner import Options, run
from fastckpt.bench.settings import MODES, SECTIONS

__all__ = ["MODES", "SECTIONS", "Options", "run"]

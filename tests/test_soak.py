"""Soak: 500 background saves during one training run (a train step, then a background
save awaited before the next step, rotating over `.safetensors`, `.weights.h5` and legacy
`.h5`), in a child process. Resident memory, open file descriptors and threads must stay
flat after warm-up: a leak of one buffer, one descriptor or one writer thread per save
would show as steady growth.

`.keras` is measured apart: every `.keras` save runs Keras's own `_save_state` walk (for
the model's assets), and that walk grows RSS by tens of KiB per call in Keras 3.15 / TF
2.21, as Keras's own `model.save` does. The test holds fastckpt to no more than Keras.
"""

from __future__ import annotations

import os

from fastckpt import _fastckpt
from fastckpt.verify import verify

SAVES = 500
EVERY = 25
WARMUP = 100  # the first saves fill caches and the snapshot arena, and TF's allocator


def test_500_background_saves_leak_nothing(forkserver, tmp_path):
    suffixes = [".safetensors", ".weights.h5", ".h5"]
    child = forkserver.start(
        "soak", folder=str(tmp_path), saves=SAVES, every=EVERY, suffixes=suffixes
    )
    status = child.wait_exit(timeout=300)
    assert status == {"code": 0}, child.seen[-3:]
    samples = child.events_named("sample")
    assert len(samples) == SAVES // EVERY
    after = [s for s in samples if s["saves"] > WARMUP]
    base = after[0]
    print("\nsaves  rss(MiB)  fds  threads  tasks")
    for s in samples:
        mib = s["rss"] / 2**20
        print(f"{s['saves']:5}  {mib:8.1f}  {s['fds']:3}  {s['threads']:7}  {s['tasks']:5}")
    assert max(s["fds"] for s in after) <= base["fds"], "file descriptors grew"
    assert max(s["threads"] for s in after) <= base["threads"], "Python threads grew"
    assert max(s["tasks"] for s in after) <= base["tasks"] + 2, "OS threads grew"
    growth = after[-1]["rss"] - base["rss"]
    per_save = growth / (after[-1]["saves"] - base["saves"])
    assert growth < 4 << 20 and per_save < 4 << 10, (
        f"RSS grew {growth / 2**20:.1f} MiB over {SAVES - WARMUP} saves"
    )
    names = os.listdir(tmp_path)
    assert not [n for n in names if _fastckpt.is_temp_name(n)], names
    for suffix in suffixes:
        assert verify(tmp_path / f"ckpt{suffix}").ok


def test_keras_zip_saves_grow_no_more_than_keras_own(forkserver, tmp_path):
    child = forkserver.start("keras_zip_growth", folder=str(tmp_path), saves=120)
    assert child.wait_exit(timeout=300) == {"code": 0}, child.seen[-3:]
    growth = {g["writer"]: g["bytes"] for g in child.events_named("growth")}
    print(f"\nRSS growth over 120 .keras saves: {growth}")
    assert growth["fastckpt"] <= 1.5 * max(growth["keras"], 0) + (2 << 20), growth

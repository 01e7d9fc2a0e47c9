"""Saving: every contender of `fastckpt bench`, plus the floors, on one model."""

import os

import pytest

import fastckpt
from fastckpt.bench import contenders, floors
from fastckpt.bench.models import state_bytes

SAVERS = [c for c in contenders.save_contenders() if c.available]


def _save_rounds(benchmark, contender, model, folder):
    path = os.path.join(folder, f"bench{contender.suffix}")
    fastckpt.save(model, os.path.join(folder, "prime.weights.h5"))  # walk + snapshot arena
    benchmark.extra_info["contender"] = contender.name
    benchmark.extra_info["state_bytes"] = state_bytes(model)
    benchmark.pedantic(
        contender.save,
        args=(model, path),
        setup=lambda: floors.remove_if_exists(path),
        rounds=5,
        warmup_rounds=1,
    )


@pytest.mark.parametrize("contender", SAVERS, ids=lambda c: c.name)
def test_save_64mib(benchmark, contender, model_64mib, target):
    _save_rounds(benchmark, contender, model_64mib, target)


def test_floor_write_64mib(benchmark, model_64mib, target):
    buf = floors.touched(state_bytes(model_64mib))
    path = os.path.join(target, "floor.bin")
    benchmark.pedantic(floors.write_floor, args=(buf, path), rounds=5, warmup_rounds=1)


def test_floor_memcpy_64mib(benchmark, model_64mib):
    snap = floors.SnapshotFloor(floors.state_views(model_64mib))
    benchmark.pedantic(snap, rounds=10, warmup_rounds=1)


SMALL = [
    c
    for c in SAVERS
    if c.suffix in (".weights.h5", ".keras", ".safetensors") and "background" not in c.name
]


@pytest.mark.parametrize("contender", SMALL, ids=lambda c: c.name)
def test_save_1000_variables(benchmark, contender, model_1000_variables, target):
    _save_rounds(benchmark, contender, model_1000_variables, target)

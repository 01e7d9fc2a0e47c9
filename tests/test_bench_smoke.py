"""`fastckpt bench --quick` end to end, and `fastckpt inspect`: files and keys, never times."""

import json
import os
import subprocess
import sys

import pytest

import fastckpt
from conftest import small_model
from fastckpt.bench import training
from fastckpt.bench.wholefit import backends_available as wholefit_backends
from fastckpt.cli import main

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(fastckpt.__file__)))


def _run_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PYTHON_DIR, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "fastckpt.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    disk = tmp_path_factory.mktemp("bench-disk")
    tmpfs = "/dev/shm" if os.path.isdir("/dev/shm") else "none"
    done = _run_cli(
        "bench", "--quick", "--out", str(out), "--disk", str(disk), "--tmpfs", tmpfs, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, json.load(f), done.stdout


def test_quick_bench_writes_json_markdown_and_plots(quick_run):
    out, results, stdout = quick_run
    for name in ("results.json", "results.md", "summary.png", "stall.png", "throughput.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[" in stdout and "throughput:" in stdout  # progress lines with elapsed time
    assert results["mode"] == "quick"
    assert results["errors"] == {}
    assert not [p for p in os.listdir(out) if p.startswith("fastckpt-bench-")]  # scratch removed


def test_quick_bench_records_the_machine(quick_run):
    _, results, _ = quick_run
    m = results["machine"]
    assert m["cpus"] >= 1 and m["cpu_model"]
    assert m["memory"]["MemTotal"] > 0
    for lib in ("keras", "tensorflow", "numpy", "h5py", "safetensors", "fastckpt"):
        assert lib in m["libraries"]
    assert m["targets"]["disk"]["fstype"]
    assert set(results["section_seconds"]) == {
        "wholefit",
        "throughput",
        "threads",
        "variables",
        "stall",
        "slowdown",
        "load",
        "memory",
    }


def test_quick_bench_has_every_contender(quick_run):
    _, results, _ = quick_run
    by_section: dict[str, set[str]] = {}
    for r in results["records"]:
        by_section.setdefault(r["section"], set()).add(r["contender"])
        assert {"target", "case", "quantities", "available", "note"} <= set(r)
        for q in r["quantities"].values():
            assert {"median", "min", "max", "n", "runs"} <= set(q)
    assert {
        "fastckpt .weights.h5",
        "fastckpt .keras",
        "fastckpt .safetensors",
        "fastckpt .weights.h5 (background)",
        "keras model.save_weights",
        "keras model.save(.keras)",
        "safetensors.numpy.save_file",
        "floor: write+fsync, 1 thread",
        "floor: memcpy (snapshot)",
    } <= by_section["throughput"]
    stall = by_section["stall"]
    assert {"fit without a callback", "keras ModelCheckpoint .weights.h5"} <= stall
    assert "keras ModelCheckpoint .keras" in stall
    assert any(c.startswith("fastckpt") and c.endswith(".weights.h5") for c in stall)
    # Orbax is either measured or listed as not installed, never a failure.
    orbax = [r for r in results["records"] if r["contender"] == "keras OrbaxCheckpoint"]
    assert orbax and all(r["available"] or "not installed" in r["note"] for r in orbax)
    assert "keras model.load_weights(.weights.h5)" in by_section["load"]
    assert "fastckpt.load(.weights.h5)" in by_section["load"]
    assert {"floor: read, 1 thread", "floor: read, every core"} <= by_section["load"]
    assert by_section["memory"] and by_section["slowdown"] and by_section["variables"]
    # Beside fastckpt's writes, the same bytes written by `dd` on each target, and for
    # every writer what a write took from training in all.
    slowdown = [r for r in results["records"] if r["section"] == "slowdown"]
    raw = [r for r in slowdown if r["contender"].startswith(training.RAW_WRITE)]
    assert {r["target"] for r in raw} == {r["target"] for r in slowdown}
    assert all("lost_per_write" in r["quantities"] for r in slowdown)
    wholefit = [r for r in results["records"] if r["section"] == "wholefit"]
    # Every backend this environment imports: TensorFlow and JAX (and torch in .venv-torch).
    assert {r["backend"] for r in wholefit} == set(wholefit_backends())
    assert {
        "fit without a callback",
        "floor: copy of the state, 1 thread",
        "keras ModelCheckpoint .weights.h5",
        "fastckpt ModelCheckpoint .weights.h5",
    } <= by_section["wholefit"]
    for r in wholefit:
        if r["family"] in ("keras", "fastckpt"):
            assert {"per_checkpoint", "first", "steady", "end_of_fit_wait", "train_begin"} <= set(
                r["quantities"]
            )
    targets = {r["target"] for r in results["records"]} - {"*"}
    assert "disk" in targets


def test_quick_bench_checks_the_targets(quick_run):
    out, results, _ = quick_run
    rows = results["targets"]
    assert rows and all({"target", "where", "goal", "value", "met"} <= set(r) for r in rows)
    assert any(r["target"].startswith("stall per checkpoint") for r in rows)
    assert any(r["target"].startswith("whole-fit blocked per checkpoint") for r in rows)
    assert any(r["target"].startswith("back to back") for r in rows)
    text = (out / "results.md").read_text()
    assert "## Targets" in text and "## Stall per checkpoint" in text and "## Whole fit" in text


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_read_floor_on_every_core_reads_the_whole_file(tmp_path, threads):
    """The load section's device floor reads every byte into place (a file of a few
    pieces and a ragged end), whatever the number of threads."""
    import numpy as np

    from fastckpt.bench import floors

    data = np.random.default_rng(0).integers(0, 256, 3 * floors.CHUNK + 12345, np.uint8)
    path = tmp_path / "payload.bin"
    path.write_bytes(data.tobytes())
    buf = np.zeros(data.size + 100, np.uint8)
    assert floors.read_floor_parallel(str(path), buf, threads) > 0
    np.testing.assert_array_equal(buf[: data.size], data)
    assert not buf[data.size :].any()
    with pytest.raises(ValueError, match="buffer"):
        floors.read_floor_parallel(str(path), buf[:100], threads)


def test_inspect_lists_tensors(tmp_path, capsys):
    model = small_model()
    path = tmp_path / "m.safetensors"
    fastckpt.save(model, path)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "layers/dense/vars/0" in text and "float32" in text
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "safetensors" and info["has_model_config"]
    kernel = next(t for t in info["tensors"] if t["name"] == "layers/dense/vars/0")
    assert kernel["shape"] == [4, 3] and kernel["bytes"] == 48


def test_inspect_reads_keras_files(tmp_path, capsys):
    model = small_model()
    model.save_weights(tmp_path / "k.weights.h5")
    model.save(tmp_path / "k.keras")
    for name in ("k.weights.h5", "k.keras"):
        assert main(["inspect", "--json", str(tmp_path / name)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert any(t["name"] == "layers/dense/vars/0" for t in info["tensors"])


def test_zstd_benchmark_reports_each_kind_of_state(tmp_path):
    script = os.path.join(os.path.dirname(PYTHON_DIR), "benches", "zstd_compression.py")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PYTHON_DIR, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, script, "--mib", "4", "--repeats", "1", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line}
    for kind in ("float32", "bfloat16", "optimizer"):
        ratio = rows[kind][5]
        assert ratio.endswith("x") and float(ratio[:-1]) > 0, rows[kind]
    assert not list(tmp_path.iterdir()), "the benchmark leaves no files"


def test_the_whole_fit_section_runs_the_backends_asked_for(monkeypatch, tmp_path):
    """`fastckpt bench --backend jax`: the whole-fit section runs JAX alone; a backend this
    environment cannot import is an error naming it, before anything runs."""
    from fastckpt.bench import wholefit

    ran: list[str] = []
    monkeypatch.setattr(wholefit, "run_backend", lambda b, *args, **kwargs: ran.append(b) or [])
    assert wholefit.run_all("quick", {"tmpfs": str(tmp_path)}, print, ("jax",)) == []
    assert ran == ["jax"]
    ran.clear()
    wholefit.run_all("quick", {"tmpfs": str(tmp_path)}, print)
    assert ran == wholefit.backends_available()
    ran.clear()
    monkeypatch.setattr(wholefit, "backends_available", lambda: ["tensorflow"])
    with pytest.raises(ValueError, match=r"\['jax'\] cannot be imported here; .* tensorflow"):
        wholefit.run_all("quick", {"tmpfs": str(tmp_path)}, print, ("tensorflow", "jax"))
    assert ran == []


def test_bench_refuses_a_backend_keras_does_not_have(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--backend", "numpy", "--only", "wholefit"])
    assert e.value.code == 2
    assert "invalid choice: 'numpy'" in capsys.readouterr().err

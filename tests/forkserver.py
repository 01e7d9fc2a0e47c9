"""A fork server: many short-lived child processes for the crash and fault tests, cheaply.

A fresh Python that imports Keras and TensorFlow takes 5-8 s; the crash tests need hundreds
of children. The server imports fastckpt (and so Keras and TensorFlow) once and runs no
TensorFlow op, so nothing but the import has happened when it forks: each child then builds
its own model and runs the whole `fastckpt.save` path, as a fresh process would.

Run as a script it is the server. Protocol, one JSON object per line:
- in (stdin): `{"id": n, "task": name, "args": {...}, "exit": "os" | "normal"}`; the child
  runs `children.<name>(emit, **args)`. With `"exit": "normal"` the child ends with
  `sys.exit`, so the interpreter finalises as any script's would (atexit, thread checks).
- out (stdout): `{"id": n, "pid": p}` when forked; whatever the task emits, as
  `{"id": n, "event": ..., ...}`; `{"id": n, "error": {...}}` if the task raised; and
  `{"id": n, "exit": {"code": c} | {"signal": s}}` once the server has reaped the child.

The parent side is `ForkServer`, used by the tests through the `forkserver` fixture.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _serve() -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(HERE))
    import children  # noqa: F401  (imports fastckpt, keras, tensorflow, h5py)

    ids: dict[int, int] = {}
    buf = b""
    out = sys.stdout.fileno()
    os.write(out, b'{"ready": true}\n')
    while True:
        readable, _, _ = select.select([0], [], [], 0.02)
        if readable:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _run_child(request)  # never returns
                ids[pid] = request["id"]
                os.write(out, json.dumps({"id": request["id"], "pid": pid}).encode() + b"\n")
        while ids:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            how = (
                {"signal": os.WTERMSIG(status)}
                if os.WIFSIGNALED(status)
                else {"code": os.WEXITSTATUS(status)}
            )
            os.write(out, json.dumps({"id": ids.pop(pid), "exit": how}).encode() + b"\n")


def _run_child(request: dict[str, Any]) -> None:
    import children

    out = sys.stdout.fileno()
    ident = request["id"]

    def emit(event: str, **fields: Any) -> None:
        line = json.dumps({"id": ident, "event": event, **fields}, default=str)
        os.write(out, line.encode() + b"\n")

    code = 0
    try:
        getattr(children, request["task"])(emit, **request.get("args", {}))
    except BaseException as e:
        code = 1
        info = {
            "type": type(e).__name__,
            "mro": [c.__name__ for c in type(e).__mro__],
            "message": str(e),
            "errno": getattr(e, "errno", None),
            "filename": getattr(e, "filename", None),
        }
        os.write(out, json.dumps({"id": ident, "error": info}, default=str).encode() + b"\n")
    if request.get("exit") == "normal":
        sys.exit(code)  # unwinds out of the server loop: a normal interpreter exit
    os._exit(code)


class Child:
    """One forked child as the parent sees it."""

    def __init__(self, server: ForkServer, ident: int, task: str) -> None:
        self.server = server
        self.id = ident
        self.task = task
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.pid = -1
        self.exit: dict[str, int] | None = None

    def _next(self, deadline: float) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(self._timeout_text())
        try:
            msg = self.events.get(timeout=remaining)
        except queue.Empty:
            raise TimeoutError(self._timeout_text()) from None
        self.seen.append(msg)
        if "exit" in msg:
            self.exit = msg["exit"]
        return msg

    def _timeout_text(self) -> str:
        return (
            f"child {self.task} (pid {self.pid}) timed out; it said "
            f"{self.seen[-5:]}; server log tail:\n{self.server.log_tail()}"
        )

    def expect_key(self, key: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next(deadline)
            if key in msg:
                return msg
            if "error" in msg or "exit" in msg:
                raise AssertionError(f"child {self.task} ended while waiting for {key}: {msg}")

    def expect(self, event: str, timeout: float = 120) -> dict[str, Any]:
        """The next event named `event`; AssertionError if the child fails first."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next(deadline)
            if msg.get("event") == event:
                return msg
            if "error" in msg or "exit" in msg:
                raise AssertionError(
                    f"child {self.task} ended while waiting for {event!r}: {msg}; it said "
                    f"{self.seen[-5:]}; server log tail:\n{self.server.log_tail()}"
                )

    def wait_exit(self, timeout: float = 120) -> dict[str, int]:
        """Waits until the server has reaped the child; returns `{"code": c}` or
        `{"signal": s}`."""
        deadline = time.monotonic() + timeout
        while self.exit is None:
            self._next(deadline)
        return self.exit

    def outcome(self, timeout: float = 120) -> tuple[dict[str, int], dict[str, Any] | None]:
        """Exit status and the error the task raised, if any."""
        status = self.wait_exit(timeout)
        errors = [m["error"] for m in self.seen if "error" in m]
        return status, (errors[0] if errors else None)

    def events_named(self, event: str) -> list[dict[str, Any]]:
        return [m for m in self.seen if m.get("event") == event]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)


class ForkServer:
    """Starts the server and hands out children."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = dict(os.environ)
        env.setdefault("KERAS_BACKEND", "tensorflow")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        self._children: dict[int, Child] = {}
        self._pending: dict[int, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(180):
            raise RuntimeError(f"fork server did not start:\n{self.log_tail()}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("ready"):
                self._ready.set()
                continue
            with self._lock:
                child = self._children.get(msg["id"])
                if child is None:
                    self._pending.setdefault(msg["id"], []).append(msg)
                    continue
            child.events.put(msg)

    def start(self, task: str, *, normal_exit: bool = False, **args: Any) -> Child:
        """Forks a child running `children.<task>(emit, **args)`."""
        with self._lock:
            ident = self._next_id
            self._next_id += 1
        exit_how = "normal" if normal_exit else "os"
        request = {"id": ident, "task": task, "args": args, "exit": exit_how}
        child = Child(self, ident, task)
        with self._lock:
            self._children[ident] = child
            for msg in self._pending.pop(ident, []):
                child.events.put(msg)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        child.pid = child.expect_key("pid", timeout=30)["pid"]
        return child

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        for child in list(self._children.values()):
            if child.exit is None:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self._reader.join(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


if __name__ == "__main__":
    _serve()

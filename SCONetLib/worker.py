"""Inference in a persistent worker process: a :class:`SCONetLib.infer.Segmenter` and its prepared feature grid,
driven by JSON lines over stdin/stdout.

Start it with ``python -m SCONetLib.worker``; talk to it with :class:`WorkerClient` (requests and replies) or
:class:`RemoteSegmenter` (the ``prepare`` / ``segment`` / ``probabilities`` calls of ``Segmenter``). The worker
keeps the segmenter and the prepared volume between requests, so a new output spacing only runs the decoder.

Why a process: inside 3D Slicer the main thread holds Python's GIL while it idles in the Qt event loop, so a
Python thread running torch there barely advances. A process also isolates crashes and out-of-memory kills, can
be killed to cancel, and frees all GPU memory when it ends. The client side creates no thread (3D Slicer polls it
from a ``qt.QTimer``; :class:`SubprocessTransport`, for plain Python, reads the pipes in two daemon threads).

Protocol (version :data:`PROTOCOL_VERSION`): UTF-8 JSON objects, one per line.

Requests (stdin), each with a client-chosen integer ``id`` and an ``op``:

* ``prepare``: ``image`` (array file, below), ``key`` (any string naming the volume), ``weights`` (path or
  null: the bundled model), ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``). Runs
  ``Segmenter.prepare`` (point stage + encoder), creating the segmenter first if ``weights``/``device`` changed.
* ``segment``: ``key``, ``weights``, ``device``, ``spacing`` (null: the input grid; a number or three numbers,
  mm), optional ``image`` (then the volume is prepared first), and output paths ``labels``, ``probabilities``,
  ``entropy`` (each null or a ``.npy`` path to write). Decodes the prepared volume ``key``; fails with
  ``NotPrepared`` if the worker holds another one.
* ``devices``: the compute devices torch sees. ``stats``: what the worker did (its ``Segmenter`` calls, in
  order, the segmenters it created and the geometry of the last prepared image).
* ``cancel`` (``id`` of the request to cancel: running or queued), ``quit``.

Replies (stdout), each with the request's ``id``: ``{"event": "progress", "fraction": f, "message": m}`` (at most
every :data:`PROGRESS_INTERVAL_S` for the same message), then one of ``done`` (the op's result, ``warnings``: the
engine's warnings as text, ``seconds``: the op's wall time in the worker), ``error`` (``type``: exception class name, ``message``) or ``cancelled``. ``done``,
``error`` and ``cancelled`` also carry ``prepared``: ``[key, weights, device]`` of the volume the worker now
holds, or null. At start the worker writes ``{"event": "ready", "protocol": 1, "pid": …, "python": …}``.
Anything else the process prints goes to stderr.

Array files: ``{"path": ….npy, "size": [i, j, k], "spacing": […], "origin": […], "direction": [9 numbers]}``:
a (K, J, I) or (K, J, I, C) array (``numpy.save``) and its :class:`SCONetLib.geometry.Grid` (LPS, mm). JSON
floats round-trip exactly, so the geometry crosses the process boundary unchanged.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import logging
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

from .geometry import Grid
from .progress import Cancelled, ProgressCallback, report, sub_progress

logger = logging.getLogger(__name__)

#: Version of the request/reply protocol described in the module docstring.
PROTOCOL_VERSION = 1
#: Segmenter the worker creates unless ``--factory`` names another: ``MODULE:CALLABLE``, called as
#: ``callable(weights=…, device=…)``, returning an object with ``prepare``, ``segment`` and ``probabilities``.
DEFAULT_FACTORY = "SCONetLib.infer:Segmenter"
#: Least time between two progress replies carrying the same message (s).
PROGRESS_INTERVAL_S = 0.1
#: Time a cancelled request may take to stop before :meth:`WorkerClient.wait` kills the worker (s).
CANCEL_GRACE_S = 10.0
#: Time :meth:`WorkerClient.stop` waits for the worker to quit before killing it (s).
QUIT_GRACE_S = 2.0
#: Root folder holding the ``SCONetLib`` package (put on the worker's ``PYTHONPATH``).
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


# ============================================================================ array files


def save_array(path, array: np.ndarray, grid: Grid) -> dict:
    """Write a (K, J, I) or (K, J, I, C) array with ``numpy.save``; return its description (module docstring)."""
    np.save(str(path), np.ascontiguousarray(array), allow_pickle=False)
    return {"path": str(path), "size": list(grid.size), "spacing": list(grid.spacing), "origin": list(grid.origin),
            "direction": list(grid.direction)}


def load_array(spec: dict) -> tuple:
    """``(array, Grid)`` of an array file described by :func:`save_array`."""
    array = np.load(spec["path"], allow_pickle=False)
    grid = Grid(tuple(int(s) for s in spec["size"]), tuple(float(s) for s in spec["spacing"]),
                tuple(float(o) for o in spec["origin"]), tuple(float(d) for d in spec["direction"]))
    if tuple(array.shape[:3]) != grid.size[::-1]:
        raise ValueError(f"{spec['path']}: array shape {array.shape} does not match grid size {grid.size}")
    return array, grid


def save_image(path, image: sitk.Image) -> dict:
    """Write a 3D SimpleITK image (scalar or vector) as an array file; return its description."""
    return save_array(path, sitk.GetArrayViewFromImage(image), Grid.of(image))


def load_image(spec: dict) -> sitk.Image:
    """SimpleITK image (scalar, or vector for a (K, J, I, C) array) of an array file."""
    array, grid = load_array(spec)
    return grid.apply_to(sitk.GetImageFromArray(array, isVector=array.ndim == 4))


# ============================================================================ errors


class WorkerError(RuntimeError):
    """An error raised in the worker whose type has no counterpart here; ``type_name`` is its class name."""

    def __init__(self, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name


class WorkerCrashed(RuntimeError):
    """The worker process ended while requests were pending (crash, out-of-memory kill, killed by the user)."""


class NotPrepared(RuntimeError):
    """A ``segment`` request named a volume the worker does not hold (send its ``image`` again)."""


#: Exceptions re-raised with their own type on the client side.
_KNOWN_ERRORS = {cls.__name__: cls for cls in (
    ValueError, TypeError, FileNotFoundError, RuntimeError, MemoryError, OSError, KeyError, ModuleNotFoundError,
    ImportError, NotPrepared)}


def error_from_reply(type_name: str, message: str) -> Exception:
    """The exception to raise for an ``error`` reply (builtin types keep their type, others: WorkerError)."""
    cls = _KNOWN_ERRORS.get(type_name)
    return cls(message) if cls is not None else WorkerError(type_name, message)


# ============================================================================ the worker process


class _Server:
    """The worker's state and request loop. Replies are written by the main thread only; a reader thread turns
    stdin lines into queued requests and records cancellations at once."""

    def __init__(self, factory_name: str, out):
        self.factory_name = factory_name
        self.out = out
        self.segmenter = None
        self.segmenter_key = None        # (weights, device) of self.segmenter
        self.prepared = None             # client key of the prepared volume
        self.calls: list = []            # Segmenter methods called, in order
        self.created: list = []          # (weights, device) of every segmenter created
        self.image: Optional[dict] = None  # geometry of the last prepared image
        self.requests: queue.Queue = queue.Queue()
        self.cancelled: set = set()
        self.stopping = False
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ I/O

    def send(self, message: dict) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def read_requests(self, stream) -> None:
        """Reader thread: queue requests; ``cancel`` and ``quit`` take effect at once. EOF means quit."""
        for raw in stream:
            try:
                request = json.loads(raw.decode("utf-8"))
                op = request["op"]
            except (ValueError, KeyError, TypeError):
                logger.error("ignoring a malformed request line: %r", raw[:200])
                continue
            if op == "cancel":
                with self.lock:
                    self.cancelled.add(request.get("id"))
            elif op == "quit":
                break
            else:
                self.requests.put(request)
        self.stopping = True
        self.requests.put(None)

    def is_cancelled(self, request_id) -> bool:
        with self.lock:
            return self.stopping or request_id in self.cancelled

    def progress_for(self, request_id) -> ProgressCallback:
        last = {"time": 0.0, "message": None}

        def callback(fraction: float, message: str) -> None:
            if self.is_cancelled(request_id):
                raise Cancelled("cancelled by the client")
            now = time.monotonic()
            if message != last["message"] or now - last["time"] >= PROGRESS_INTERVAL_S or fraction >= 1.0:
                last.update(time=now, message=message)
                self.send({"id": request_id, "event": "progress", "fraction": round(float(fraction), 4),
                           "message": message})

        return callback

    def state(self) -> dict:
        if self.prepared is None:
            return {"prepared": None}
        return {"prepared": [self.prepared, *self.segmenter_key]}

    # ------------------------------------------------------------------ loop

    def serve(self) -> None:
        handlers = {"prepare": self.op_prepare, "segment": self.op_segment, "devices": self.op_devices,
                    "stats": self.op_stats}
        while True:
            request = self.requests.get()
            if request is None:
                return
            request_id, op = request.get("id"), request["op"]
            try:
                if self.is_cancelled(request_id):
                    raise Cancelled("cancelled before it started")
                if op not in handlers:
                    raise ValueError(f"unknown op {op!r}; expected one of {sorted(handlers)} or cancel, quit")
                start = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = handlers[op](request, self.progress_for(request_id))
                result["warnings"] = [str(w.message) for w in caught]
                result["seconds"] = round(time.perf_counter() - start, 4)
                self.send({"id": request_id, "event": "done", **result, **self.state()})
            except Cancelled:
                self.send({"id": request_id, "event": "cancelled", **self.state()})
            except Exception as error:  # reported to the client, which raises it
                traceback.print_exc(file=sys.stderr)
                self.send({"id": request_id, "event": "error", "type": type(error).__name__, "message": str(error),
                           **self.state()})
            finally:
                with self.lock:
                    self.cancelled.discard(request_id)

    # ------------------------------------------------------------------ ops

    def segmenter_for(self, weights, device: str):
        """The segmenter for ``(weights, device)``, created (dropping the previous one) if they changed."""
        key = (weights, device)
        if self.segmenter is None or self.segmenter_key != key:
            self.segmenter, self.segmenter_key, self.prepared = None, None, None
            module_name, _, attribute = self.factory_name.partition(":")
            factory = getattr(importlib.import_module(module_name), attribute)
            self.segmenter = factory(weights=weights, device=device)
            self.segmenter_key = key
            self.created.append({"weights": weights, "device": device})
        return self.segmenter

    def prepare(self, request: dict, progress) -> None:
        segmenter = self.segmenter_for(request.get("weights"), request.get("device", "auto"))
        report(progress, 0.0, "reading the volume")
        image = load_image(request["image"])
        self.prepared = None
        self.calls.append("prepare")
        segmenter.prepare(image, progress=progress)
        self.prepared = str(request["key"])
        self.image = {name: request["image"][name] for name in ("size", "spacing", "origin", "direction")}

    def op_prepare(self, request: dict, progress) -> dict:
        self.prepare(request, progress)
        return {"device": str(getattr(self.segmenter, "device", ""))}

    def op_segment(self, request: dict, progress) -> dict:
        start = 0.0
        if request.get("image") is not None:
            self.prepare(request, sub_progress(progress, 0.0, 0.6))
            start = 0.6
        segmenter = self.segmenter_for(request.get("weights"), request.get("device", "auto"))
        if self.prepared != str(request["key"]):
            raise NotPrepared(f"the worker holds volume {self.prepared!r}, not {request['key']!r}; send its image")
        spacing = request.get("spacing")
        want_labels = request.get("labels") is not None
        want_probabilities = request.get("probabilities") is not None or request.get("entropy") is not None
        middle = (start + 1.0) / 2 if want_labels and want_probabilities else 1.0
        result = {"device": str(getattr(segmenter, "device", "")), "labels": None, "probabilities": None,
                  "entropy": None}
        if want_labels:
            self.calls.append("segment")
            labels = segmenter.segment(spacing=spacing, progress=sub_progress(progress, start, middle),
                                       postprocess=bool(request.get("postprocess", False)))
            result["labels"] = save_image(request["labels"], labels)
        if want_probabilities:
            self.calls.append("probabilities")
            probabilities, entropy = segmenter.probabilities(
                spacing=spacing, progress=sub_progress(progress, middle if want_labels else start, 1.0))
            for name, image in (("probabilities", probabilities), ("entropy", entropy)):
                if request.get(name) is not None:
                    result[name] = save_image(request[name], image)
        return result

    def op_devices(self, request: dict, progress) -> dict:
        import torch

        devices = ["cpu"]
        if torch.cuda.is_available():
            devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
        return {"devices": devices}

    def op_stats(self, request: dict, progress) -> dict:
        return {"calls": list(self.calls), "segmenters": list(self.created), "image": self.image,
                "pid": os.getpid()}


def main(argv=None) -> int:
    """Entry point of ``python -m SCONetLib.worker``: serve requests until ``quit`` or the end of stdin."""
    parser = argparse.ArgumentParser(prog="python -m SCONetLib.worker",
                                     description="SCONet inference worker (JSON lines over stdin/stdout; see the "
                                                 "SCONetLib.worker docstring).")
    parser.add_argument("--factory", default=DEFAULT_FACTORY,
                        help="MODULE:CALLABLE creating the segmenter, called as f(weights=..., device=...) "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    # Replies get the real stdout; everything else that writes to stdout (libraries, print) goes to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", newline="\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="SCONet worker: %(levelname)s %(message)s")
    server = _Server(args.factory, protocol)
    server.send({"event": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                 "python": platform.python_version()})
    threading.Thread(target=server.read_requests, args=(sys.stdin.buffer,), name="requests", daemon=True).start()
    server.serve()
    return 0


# ============================================================================ the client side


class SubprocessTransport:
    """Runs the worker with :mod:`subprocess` for plain Python; two daemon threads read its stdout and stderr.

    Inside 3D Slicer use a ``qt.QProcess`` transport instead (the module has one): threads there only run while
    the main thread executes Python. Any object with these methods can serve as a transport.
    """

    def __init__(self):
        self._process = None
        self._chunks = {"out": collections.deque(), "err": collections.deque()}
        self._readers: list = []
        self._arrived = threading.Event()

    def start(self, argv: list, environment: dict) -> None:
        """Start ``argv`` with the current environment updated by ``environment``; RuntimeError if it cannot."""
        env = dict(os.environ)
        env.update(environment)
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        try:
            self._process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, env=env, creationflags=flags)
        except OSError as error:
            raise RuntimeError(f"could not start the SCONet worker ({argv[0]}): {error}") from error
        for name, stream in (("out", self._process.stdout), ("err", self._process.stderr)):
            reader = threading.Thread(target=self._read, args=(stream, self._chunks[name]), daemon=True,
                                      name=f"SCONet worker std{name}")
            reader.start()
            self._readers.append(reader)

    def _read(self, stream, chunks) -> None:
        while True:
            data = stream.read1(65536)
            if not data:
                break
            chunks.append(data)
            self._arrived.set()
        self._arrived.set()

    def write(self, data: bytes) -> None:
        try:
            self._process.stdin.write(data)
            self._process.stdin.flush()
        except OSError:
            pass   # the process has ended: the client notices when it polls

    def _drain(self, name: str) -> bytes:
        chunks = self._chunks[name]
        parts = []
        while chunks:
            parts.append(chunks.popleft())
        return b"".join(parts)

    def read_output(self) -> bytes:
        """Bytes the worker wrote to stdout since the last call (never blocks)."""
        return self._drain("out")

    def read_errors(self) -> bytes:
        """Bytes the worker wrote to stderr since the last call (never blocks)."""
        return self._drain("err")

    def is_running(self) -> bool:
        """False once the process has ended and both pipes are read to their end."""
        return self._process.poll() is None or any(reader.is_alive() for reader in self._readers)

    def wait_for_output(self, timeout: float) -> None:
        """Block until output arrives, the process ends, or ``timeout`` seconds pass."""
        self._arrived.wait(timeout)
        self._arrived.clear()

    def exit_code(self) -> Optional[int]:
        """The exit status once ended (negative: the signal that killed it on POSIX), else None."""
        return self._process.poll()

    def pid(self) -> Optional[int]:
        return self._process.pid

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()


@dataclass
class Request:
    """One request sent to the worker. ``state``: ``"pending"``, ``"done"``, ``"error"`` or ``"cancelled"``;
    ``progress``: the last (fraction, message); ``result``: the ``done`` reply; ``error``: the exception."""

    id: int
    op: str
    state: str = "pending"
    progress: tuple = (0.0, "")
    result: dict = field(default_factory=dict)
    error: Optional[BaseException] = None

    @property
    def finished(self) -> bool:
        return self.state != "pending"


class WorkerClient:
    """Client of one worker process, started on the first request and started again after it ended.

    Thread-free: :meth:`poll` handles what the worker wrote so far and never blocks (call it from a timer in a
    GUI); :meth:`wait` and :meth:`call` block until a request finishes.

    Parameters
    ----------
    command : list of str, optional
        The worker's command line; default ``[sys.executable, "-m", "SCONetLib.worker"]``.
    transport : callable, optional
        Creates the object that runs the process (default :class:`SubprocessTransport`).

    Examples
    --------
    >>> client = WorkerClient()                                         # doctest: +SKIP
    >>> client.call("devices")["devices"]                               # doctest: +SKIP
    ['cpu']
    >>> client.close()                                                  # doctest: +SKIP
    """

    def __init__(self, command: Optional[list] = None, transport: Callable = SubprocessTransport):
        self.command = list(command) if command else [sys.executable, "-m", "SCONetLib.worker"]
        self._transport_factory = transport
        self._transport = None
        self._pending: dict = {}
        self._next_id = 1
        self._stdout = b""
        self._stderr = b""
        self._stderr_tail: collections.deque = collections.deque(maxlen=20)
        self._stopping = False
        self._tempdir: Optional[str] = None
        self._files = 0
        #: ``[key, weights, device]`` of the volume the worker holds prepared, or None.
        self.prepared: Optional[list] = None
        #: Processes started so far.
        self.starts = 0

    # ------------------------------------------------------------------ process

    @property
    def running(self) -> bool:
        return self._transport is not None and self._transport.is_running()

    @property
    def pid(self) -> Optional[int]:
        return self._transport.pid() if self._transport is not None else None

    def start(self) -> None:
        """Start the worker unless it runs (a finished one is reported first by :meth:`poll`)."""
        self.poll()
        if self._transport is not None:
            return
        transport = self._transport_factory()
        path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
        transport.start(self.command, {"PYTHONPATH": path})
        self._transport, self._stdout, self._stderr = transport, b"", b""
        self.prepared = None
        self.starts += 1

    def new_path(self, stem: str) -> str:
        """A fresh ``.npy`` path in this client's temporary folder (removed by :meth:`close`)."""
        if self._tempdir is None:
            self._tempdir = tempfile.mkdtemp(prefix="SCONet-")
        self._files += 1
        return os.path.join(self._tempdir, f"{stem}-{self._files}.npy")

    # ------------------------------------------------------------------ requests

    def submit(self, op: str, **params) -> Request:
        """Send a request (starting the worker if needed) and return it at once."""
        self.start()
        request = Request(self._next_id, op)
        self._next_id += 1
        self._pending[request.id] = request
        self._transport.write((json.dumps({"id": request.id, "op": op, **params}) + "\n").encode("utf-8"))
        return request

    def cancel(self, request: Request) -> None:
        """Ask the worker to stop ``request`` (it then ends ``cancelled``); nothing if it has finished."""
        if not request.finished and self.running:
            self._transport.write((json.dumps({"id": request.id, "op": "cancel"}) + "\n").encode("utf-8"))

    def poll(self) -> None:
        """Handle everything the worker wrote so far; if it has ended, fail its pending requests."""
        if self._transport is None:
            return
        running = self._transport.is_running()   # before reading: what it wrote before ending is then read too
        self._stderr += self._transport.read_errors()
        *lines, self._stderr = self._stderr.split(b"\n")
        for line in lines:
            text = line.decode("utf-8", errors="replace").rstrip()
            if text:
                self._stderr_tail.append(text)
                logger.info("%s", text)
        self._stdout += self._transport.read_output()
        *lines, self._stdout = self._stdout.split(b"\n")
        for line in lines:
            self._handle(line)
        if not running:
            self._ended()

    def _handle(self, line: bytes) -> None:
        try:
            message = json.loads(line.decode("utf-8"))
            event = message["event"]
        except (ValueError, KeyError, TypeError):
            logger.warning("SCONet worker: unexpected output %r", line[:200])
            return
        request = self._pending.get(message.get("id"))
        if event == "ready":
            logger.info("SCONet worker %s ready (Python %s)", message.get("pid"), message.get("python"))
            return
        if request is None:
            return
        if event == "progress":
            request.progress = (float(message["fraction"]), str(message["message"]))
            return
        self.prepared = message.get("prepared")
        if event == "done":
            request.result = message
            request.state = "done"
        elif event == "cancelled":
            request.state = "cancelled"
        else:
            request.error = error_from_reply(str(message.get("type")), str(message.get("message")))
            request.state = "error"
        del self._pending[request.id]

    def _ended(self) -> None:
        code = self._transport.exit_code()
        self._transport, self.prepared = None, None
        pending, self._pending = list(self._pending.values()), {}
        if self._stopping:
            for request in pending:
                request.state = "cancelled"
            return
        how = ("killed or crashed" if code is None else f"killed by signal {-code}" if code < 0
               else f"exit code {code}")
        tail = "\n".join(self._stderr_tail)
        for request in pending:
            request.error = WorkerCrashed(
                f"the SCONet worker process stopped unexpectedly ({how}) during '{request.op}'; it will be started "
                f"again on the next run." + (f" Its last messages:\n{tail}" if tail else ""))
            request.state = "error"

    def wait(self, request: Request, progress: Optional[ProgressCallback] = None,
             timeout: Optional[float] = None) -> Request:
        """Block until ``request`` finishes, calling ``progress(fraction, message)`` on each change.

        If ``progress`` raises :class:`Cancelled`, the request is cancelled (the worker is killed if it has not
        stopped after :data:`CANCEL_GRACE_S`) and ``Cancelled`` is raised again once it has finished.
        ``TimeoutError`` after ``timeout`` seconds (the request goes on).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        cancelled_at, shown = None, None
        while True:
            self.poll()
            if progress is not None and cancelled_at is None and request.progress != shown:
                shown = request.progress
                try:
                    progress(*request.progress)
                except Cancelled:
                    cancelled_at = time.monotonic()
                    self.cancel(request)
            if request.finished:
                if cancelled_at is not None:
                    raise Cancelled("cancelled by the progress callback")
                return request
            if cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                self._stopping = True
                self.kill()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the SCONet worker did not finish '{request.op}' within {timeout} s")
            if self._transport is not None:
                self._transport.wait_for_output(0.05)

    def call(self, op: str, progress: Optional[ProgressCallback] = None, **params) -> dict:
        """Submit, wait, and return the ``done`` reply; raise the worker's error, or ``Cancelled``."""
        request = self.wait(self.submit(op, **params), progress)
        if request.state == "error":
            raise request.error
        if request.state == "cancelled":
            raise Cancelled(f"'{op}' was cancelled")
        return request.result

    def kill(self) -> None:
        """Kill the worker at once (pending requests fail with :class:`WorkerCrashed` when polled)."""
        if self._transport is not None:
            self._transport.kill()

    def stop(self) -> None:
        """End the worker (``quit``, then kill after :data:`QUIT_GRACE_S`); pending requests end ``cancelled``."""
        if self._transport is None:
            return
        self._stopping = True
        try:
            self._transport.write(b'{"op": "quit"}\n')
            deadline = time.monotonic() + QUIT_GRACE_S
            while self.running and time.monotonic() < deadline:
                self._transport.wait_for_output(0.05)
                self._transport.read_output()
            self.kill()
            while self._transport is not None:
                self.poll()
                if self._transport is not None:
                    self._transport.wait_for_output(0.05)
        finally:
            self._stopping = False

    def close(self) -> None:
        """Stop the worker and remove the temporary folder."""
        self.stop()
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _spacing_json(spacing):
    """A ``spacing`` argument as JSON: None, a float or a list of three floats."""
    if spacing is None:
        return None
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    return float(values[0]) if values.size == 1 else [float(v) for v in values]


class RemoteSegmenter:
    """:class:`SCONetLib.infer.Segmenter`'s ``prepare`` / ``segment`` / ``probabilities``, run by a worker process.

    Arguments and results are those of ``Segmenter`` (images keep their exact geometry); errors raised in the
    worker are raised again here (builtin types keep their type), ``Cancelled`` from ``progress`` cancels the
    work in the worker. ``close()`` (or ``with``) ends the worker.

    Examples
    --------
    >>> with RemoteSegmenter(device="cpu") as segmenter:       # doctest: +SKIP
    ...     segmenter.prepare(ct)
    ...     labels = segmenter.segment(spacing=2.0)            # decoder only, in the same worker
    """

    def __init__(self, weights=None, device: str = "auto", client: Optional[WorkerClient] = None):
        self.client = client if client is not None else WorkerClient()
        self.weights = None if weights is None else str(weights)
        self.device = str(device)
        self.device_name = ""
        self._key: Optional[str] = None

    @property
    def is_prepared(self) -> bool:
        """Whether the worker holds this segmenter's prepared volume (False after the worker ended)."""
        return self._key is not None and self.client.prepared == [self._key, self.weights, self.device]

    def prepare(self, image: sitk.Image, progress: Optional[ProgressCallback] = None) -> None:
        key = uuid.uuid4().hex
        self._key = None
        spec = save_image(self.client.new_path("input"), image)
        try:
            result = self.client.call("prepare", progress, image=spec, key=key, weights=self.weights,
                                      device=self.device)
        finally:
            os.remove(spec["path"])
        self._key, self.device_name = key, result["device"]
        self._warn(result)

    def segment(self, spacing=None, progress: Optional[ProgressCallback] = None, postprocess: bool = False
                ) -> sitk.Image:
        return self._decode(spacing, progress, labels=True, postprocess=postprocess)[0]

    def probabilities(self, spacing=None, progress: Optional[ProgressCallback] = None) -> tuple:
        return self._decode(spacing, progress, labels=False)

    def _decode(self, spacing, progress, labels: bool, postprocess: bool = False) -> tuple:
        if not self.is_prepared:
            raise RuntimeError("no volume is prepared: call prepare(image) first (it did not run, failed or was "
                               "cancelled, or the worker process ended)")
        outputs = ("labels",) if labels else ("probabilities", "entropy")
        paths = {name: self.client.new_path(name) for name in outputs}
        try:
            result = self.client.call("segment", progress, key=self._key, weights=self.weights, device=self.device,
                                      spacing=_spacing_json(spacing), postprocess=bool(postprocess), **paths)
            images = tuple(load_image(result[name]) for name in outputs)
        finally:
            for path in paths.values():
                if os.path.exists(path):
                    os.remove(path)
        self._warn(result)
        return images

    @staticmethod
    def _warn(result: dict) -> None:
        for message in result.get("warnings", []):
            warnings.warn(message, stacklevel=3)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "RemoteSegmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    raise SystemExit(main())

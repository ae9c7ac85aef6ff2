"""Stand-in for PythonQt's ``qt`` module: signals, the widgets SCONet's ``.ui`` file uses, ``QTimer``, ``QProcess``.

Qt's event loop is emulated by two private functions: ``_process_due_timers()`` (what ``slicer.app.processEvents()``
calls: runs the timers that are due) and ``_idle(seconds)`` (the main thread waiting in the event loop). ``_idle``
and the blocking ``QProcess.waitFor…`` calls wait in C (libc ``poll`` through ``ctypes.PyDLL``) **holding the
GIL**, as Slicer's main thread does: Slicer, CTK and PythonQt never release it while Qt idles, so a Python thread
started by a module hardly runs there. ``QProcess`` runs a real child process (POSIX pipes, non-blocking reads).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import os
import subprocess
import time

# ---------------------------------------------------------------------------------------------------- event loop

#: Queued single-shot timers: (due time in seconds of time.monotonic(), callback), in insertion order.
_pending: list = []
#: Started QTimer objects.
_active_timers: list = []
#: Running QProcess objects (their pipes wake up ``_idle``).
_processes: list = []

_libc = ctypes.PyDLL(ctypes.util.find_library("c"))   # PyDLL: calls keep the GIL
_POLLIN = 0x001


class _PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


def _wait_holding_gil(fds, seconds: float) -> None:
    """Block until one of ``fds`` is readable or ``seconds`` pass, without releasing the GIL."""
    fds = list(fds)
    array = (_PollFd * max(1, len(fds)))(*[(fd, _POLLIN, 0) for fd in fds])
    _libc.poll(array if fds else None, len(fds), max(0, int(seconds * 1000)))


def _process_due_timers() -> int:
    """Run every single-shot callback and QTimer that is due (one pass of Qt's event loop); return how many ran."""
    now = time.monotonic()
    due = [entry for entry in _pending if entry[0] <= now]
    for entry in due:
        _pending.remove(entry)
    for _, callback in due:
        callback()
    ran = len(due)
    for timer in [t for t in _active_timers if t._due is not None and t._due <= now]:
        if timer not in _active_timers:
            continue
        if timer._single_shot:
            timer.stop()
        else:
            timer._due = now + timer._interval / 1000.0
        timer.timeout.emit()
        ran += 1
    return ran


def _idle(seconds: float) -> None:
    """The main thread waiting in Qt's event loop, holding the GIL: until a process has output, a timer is due,
    or ``seconds`` pass."""
    dues = [entry[0] for entry in _pending] + [t._due for t in _active_timers if t._due is not None]
    wait = min([seconds] + [due - time.monotonic() for due in dues])
    fds = [fd for process in _processes for fd in process._open_fds()]
    _wait_holding_gil(fds, max(0.0, wait))


# ---------------------------------------------------------------------------------------------------- objects


def _call_slot(slot, args) -> None:
    """Call a slot with as many of the signal's arguments as it accepts (PythonQt drops the extra ones)."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        slot(*args)
        return
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        slot(*args)
        return
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    slot(*args[:len(positional)])


class Signal:
    """A signal as PythonQt exposes it: ``connect(slot)``, ``disconnect(slot)``; ``emit`` is the stand-in's."""

    def __init__(self):
        self._slots: list = []

    def connect(self, slot) -> None:
        self._slots.append(slot)

    def disconnect(self, slot) -> bool:
        if slot in self._slots:
            self._slots.remove(slot)
            return True
        return False

    def emit(self, *args) -> None:
        for slot in list(self._slots):
            _call_slot(slot, args)


class QObject:
    """Object name, dynamic properties, children, signals (declared in ``_signals``) and PythonQt's
    ``connect("signal(args)", slot)``."""

    _signals: tuple = ()

    def __init__(self, parent=None):
        self._dynamic_properties: dict = {}
        self._children: list = []
        self._parent = None
        self.objectName = ""
        for cls in type(self).__mro__:
            for name in cls.__dict__.get("_signals", ()):
                setattr(self, name, Signal())
        if parent is not None:
            parent._add_child(self)

    @property
    def name(self) -> str:
        return self.objectName

    def _add_child(self, child) -> None:
        if child._parent is not None:
            child._parent._children.remove(child)
        child._parent = self
        self._children.append(child)

    def parent(self):
        return self._parent

    def children(self) -> list:
        return list(self._children)

    def findChildren(self, cls=None) -> list:
        found = []
        for child in self._children:
            if cls is None or isinstance(child, cls):
                found.append(child)
            found += child.findChildren(cls)
        return found

    def property(self, name):
        return self._dynamic_properties.get(name)

    def setProperty(self, name, value) -> None:
        self._dynamic_properties[name] = value

    def connect(self, signature: str, slot) -> None:
        getattr(self, signature.split("(")[0]).connect(slot)

    def disconnect(self, signature: str, slot) -> None:
        getattr(self, signature.split("(")[0]).disconnect(slot)

    def isWidgetType(self) -> bool:
        return False


class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self._layout = None

    def isWidgetType(self) -> bool:
        return True

    def setLayout(self, layout) -> None:
        self._layout = layout
        self._add_child(layout)

    def layout(self):
        return self._layout

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False


class QLayout(QObject):
    def addWidget(self, widget, *args) -> None:
        self._add_child(widget)


class QVBoxLayout(QLayout):
    pass


class QHBoxLayout(QLayout):
    pass


class QFormLayout(QLayout):
    pass


class QLabel(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.text = ""


class QPushButton(QWidget):
    _signals = ("clicked", "toggled")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.text = ""
        self.checkable = False
        self.checked = False

    def click(self) -> None:
        """As Qt: nothing happens on a disabled button."""
        if self.enabled:
            self.clicked.emit(False)


class QCheckBox(QWidget):
    _signals = ("toggled", "stateChanged")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.text = ""
        self._checked = False

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value) -> None:
        if bool(value) != self._checked:
            self._checked = bool(value)
            self.toggled.emit(self._checked)
            self.stateChanged.emit(2 if self._checked else 0)


class QComboBox(QWidget):
    _signals = ("currentIndexChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._items: list = []
        self._current = -1

    def addItem(self, text) -> None:
        self._items.append(str(text))
        if self._current < 0:
            self.currentIndex = 0

    def clear(self) -> None:
        self._items = []
        self.currentIndex = -1

    def setItemText(self, index, text) -> None:
        self._items[index] = str(text)

    def itemText(self, index) -> str:
        return self._items[index]

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentText(self) -> str:
        return self._items[self._current] if self._current >= 0 else ""

    @property
    def currentIndex(self) -> int:
        return self._current

    @currentIndex.setter
    def currentIndex(self, index) -> None:
        index = int(index) if -1 <= int(index) < len(self._items) else -1
        if index != self._current:
            self._current = index
            self.currentIndexChanged.emit(index)


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.value = 0
        self.minimum = 0
        self.maximum = 100


# ---------------------------------------------------------------------------------------------------- timers


class QTimer(QObject):
    """``QTimer()`` with ``setInterval``, ``setSingleShot``, ``start``, ``stop``, ``isActive`` and the ``timeout``
    signal, and the static ``QTimer.singleShot(msec, callable)``; both fire from the event loop."""

    _signals = ("timeout",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._interval = 0
        self._single_shot = False
        self._due = None

    def setInterval(self, msec) -> None:
        self._interval = int(msec)

    def interval(self) -> int:
        return self._interval

    def setSingleShot(self, singleShot) -> None:
        self._single_shot = bool(singleShot)

    def isActive(self) -> bool:
        return self._due is not None

    def start(self, msec=None) -> None:
        if msec is not None:
            self._interval = int(msec)
        self._due = time.monotonic() + self._interval / 1000.0
        if self not in _active_timers:
            _active_timers.append(self)

    def stop(self) -> None:
        self._due = None
        if self in _active_timers:
            _active_timers.remove(self)

    @staticmethod
    def singleShot(msec, callback) -> None:
        _pending.append((time.monotonic() + max(0, int(msec)) / 1000.0, callback))


# ---------------------------------------------------------------------------------------------------- processes


class QByteArray:
    def __init__(self, data=b""):
        self._data = data.encode("utf-8") if isinstance(data, str) else bytes(data)

    def data(self) -> bytes:
        return self._data

    def size(self) -> int:
        return len(self._data)

    def __bytes__(self) -> bytes:
        return self._data


class QProcessEnvironment:
    def __init__(self, variables=None):
        self._variables = dict(variables or {})

    @staticmethod
    def systemEnvironment() -> "QProcessEnvironment":
        return QProcessEnvironment(os.environ)

    def insert(self, name, value) -> None:
        self._variables[str(name)] = str(value)

    def value(self, name, defaultValue="") -> str:
        return self._variables.get(name, defaultValue)

    def contains(self, name) -> bool:
        return name in self._variables

    def remove(self, name) -> None:
        self._variables.pop(name, None)


class QProcess(QObject):
    """A child process with separate stdout/stderr channels, read without blocking (POSIX pipes)."""

    NotRunning, Starting, Running = 0, 1, 2
    NormalExit, CrashExit = 0, 1
    SeparateChannels, MergedChannels = 0, 1
    _signals = ("started", "finished", "errorOccurred", "readyReadStandardOutput", "readyReadStandardError")

    def __init__(self, parent=None):
        super().__init__(parent)
        self._popen = None
        self._environment = None
        self._buffers = {"out": bytearray(), "err": bytearray()}
        self._error = ""

    def setProcessChannelMode(self, mode) -> None:
        if mode != QProcess.SeparateChannels:
            raise NotImplementedError("the stand-in QProcess has separate channels only")

    def setProcessEnvironment(self, environment: QProcessEnvironment) -> None:
        self._environment = environment

    def start(self, program, arguments=()) -> None:
        env = dict(self._environment._variables) if self._environment is not None else None
        try:
            self._popen = subprocess.Popen([program, *arguments], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, env=env)
        except OSError as error:
            self._popen, self._error = None, str(error)
            self.errorOccurred.emit(0)
            return
        for stream in (self._popen.stdout, self._popen.stderr):
            os.set_blocking(stream.fileno(), False)
        _processes.append(self)

    def waitForStarted(self, msecs=30000) -> bool:
        return self._popen is not None

    def errorString(self) -> str:
        return self._error

    def processId(self) -> int:
        return self._popen.pid if self._popen is not None else 0

    def state(self) -> int:
        return QProcess.Running if self._popen is not None and self._popen.poll() is None else QProcess.NotRunning

    def exitCode(self) -> int:
        code = self._popen.poll() if self._popen is not None else None
        return 0 if code is None or code < 0 else code

    def exitStatus(self) -> int:
        code = self._popen.poll() if self._popen is not None else None
        return QProcess.CrashExit if code is not None and code < 0 else QProcess.NormalExit

    def write(self, data) -> int:
        data = data.data() if isinstance(data, QByteArray) else bytes(data)
        try:
            self._popen.stdin.write(data)
            self._popen.stdin.flush()
        except (OSError, AttributeError):
            return -1
        return len(data)

    def _open_fds(self) -> list:
        if self._popen is None:
            return []
        return [s.fileno() for s in (self._popen.stdout, self._popen.stderr) if not s.closed]

    def _pump(self) -> None:
        """Move what the pipes hold into the read buffers (as Qt's socket notifiers do)."""
        if self._popen is None:
            return
        for name, stream in (("out", self._popen.stdout), ("err", self._popen.stderr)):
            while not stream.closed:
                try:
                    data = os.read(stream.fileno(), 65536)
                except BlockingIOError:
                    break
                if not data:
                    stream.close()
                    break
                self._buffers[name] += data
        if self._popen.poll() is not None and not self._open_fds() and self in _processes:
            _processes.remove(self)
            self._popen.stdin.close()

    def _take(self, name: str) -> QByteArray:
        self._pump()
        data, self._buffers[name] = bytes(self._buffers[name]), bytearray()
        return QByteArray(data)

    def readAllStandardOutput(self) -> QByteArray:
        return self._take("out")

    def readAllStandardError(self) -> QByteArray:
        return self._take("err")

    def waitForReadyRead(self, msecs=30000) -> bool:
        deadline = time.monotonic() + msecs / 1000.0
        while True:
            self._pump()
            if self._buffers["out"]:
                return True
            if self.state() == QProcess.NotRunning and not self._open_fds():
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            _wait_holding_gil(self._open_fds(), min(remaining, 0.05))

    def waitForFinished(self, msecs=30000) -> bool:
        deadline = time.monotonic() + max(0, msecs) / 1000.0
        while self.state() == QProcess.Running:
            if time.monotonic() >= deadline:
                return False
            _wait_holding_gil([], 0.01)
        return self._popen is not None

    def kill(self) -> None:
        if self.state() == QProcess.Running:
            self._popen.kill()

    def terminate(self) -> None:
        if self.state() == QProcess.Running:
            self._popen.terminate()

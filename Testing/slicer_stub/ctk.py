"""Stand-in for CTK's Python widgets (``ctk``): the ones SCONet's ``.ui`` file uses, with Qt's property semantics."""
from __future__ import annotations

from qt import QPushButton, QWidget


class ctkCollapsibleButton(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.text = ""
        self.collapsed = False


class ctkMenuButton(QPushButton):
    pass


class ctkSliderWidget(QWidget):
    """``value`` kept within [minimum, maximum] and rounded to ``decimals``; ``valueChanged(double)`` on change
    (also when a new minimum or maximum moves the value, as in CTK)."""

    _signals = ("valueChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.decimals = 2
        self.singleStep = 1.0
        self.pageStep = 10.0
        self.suffix = ""
        self.tracking = True
        self._minimum, self._maximum, self._value = 0.0, 99.0, 0.0

    def _set(self, value) -> None:
        value = round(min(max(float(value), self._minimum), self._maximum), int(self.decimals))
        if value != self._value:
            self._value = value
            self.valueChanged.emit(value)

    @property
    def value(self) -> float:
        return self._value

    @value.setter
    def value(self, value) -> None:
        self._set(value)

    @property
    def minimum(self) -> float:
        return self._minimum

    @minimum.setter
    def minimum(self, value) -> None:
        self._minimum = float(value)
        self._maximum = max(self._maximum, self._minimum)
        self._set(self._value)

    @property
    def maximum(self) -> float:
        return self._maximum

    @maximum.setter
    def maximum(self, value) -> None:
        self._maximum = float(value)
        self._minimum = min(self._minimum, self._maximum)
        self._set(self._value)


class ctkPathLineEdit(QWidget):
    _signals = ("currentPathChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.filters = None
        self.nameFilters = []
        self._path = ""

    @property
    def currentPath(self) -> str:
        return self._path

    @currentPath.setter
    def currentPath(self, path) -> None:
        if str(path) != self._path:
            self._path = str(path)
            self.currentPathChanged.emit(self._path)

"""Stop requests: SIGTERM / SIGUSR1 (the handler only sets a flag) and a ``STOP`` file.

The CLI installs the handler before it imports torch, so a signal that arrives while a run
starts up is a clean stop request, never a kill: the trainer checks the flag before its first
step and after every step, saves, and exits 0.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

STOP_FILE = "STOP"
_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by SIGTERM/SIGUSR1 once installed (``signal`` holds the signal number)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def installed(self) -> bool:
        return bool(self._old)

    def install(self) -> StopFlag:
        """Installs the handler (idempotent; a no-op outside the main thread)."""
        for sig in _SIGNALS:
            if sig in self._old:
                continue
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        self.signal = signum

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def stop_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / STOP_FILE


_FLAG = StopFlag()


def process_stop_flag() -> StopFlag:
    """This process's flag (the CLI installs it first thing; ``train`` installs it too)."""
    return _FLAG

"""A torchrun front end whose SIGTERM / SIGUSR1 mean "save and stop", with exit status 0.

    python -m sleeptrain.launch --nproc-per-node=8 -m sleeptrain.cli train CONFIG [key=value]

takes exactly torchrun's arguments. torchrun itself treats SIGTERM as a death signal: it
forwards it to the training processes, waits at most its shutdown timeout (then SIGKILL, even
in the middle of a checkpoint write) and exits 1 even when every process saved and exited
cleanly. This launcher runs torchrun in its own session and, on SIGTERM or SIGUSR1, forwards
the signal to the training processes only (the trainer takes it as a stop request: all ranks
agree on the step, save and exit 0); torchrun then sees its processes succeed and exits 0.
SIGINT (Ctrl-C) goes to torchrun unchanged. The exit status is torchrun's (128 + signal
number when it was killed by a signal).

On a SLURM allocation the batch script's trap writes the run directory's STOP file instead
(slurm/train_7b_sleep.sh), which works with plain torchrun as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    runner = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args],
                              start_new_session=True)

    def forward(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
        workers = _children(runner.pid)
        for pid in workers or [runner.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def interrupt(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
        try:
            os.kill(runner.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGINT, interrupt)
    rc = runner.wait()  # retried after every handled signal (PEP 475)
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())

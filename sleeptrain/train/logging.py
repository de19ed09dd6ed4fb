"""Metrics logging (``metrics.jsonl`` + optional wandb) and the progress bar.

Determinism note: :class:`MetricsLogger` writes exactly the metrics it is given. Lines that are
compared across runs (e.g. an interrupted-and-resumed run against an uninterrupted one) must
therefore hold only deterministic values; the trainer keeps wall-clock quantities (timestamps,
step time, tokens/s) out of those lines, e.g. by sending them only to the progress bar or by
logging them under keys listed in :data:`NONDETERMINISTIC_KEYS`, which comparisons drop with
:func:`deterministic_view`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "METRICS_FILE",
    "NONDETERMINISTIC_KEYS",
    "WANDB_ID_FILE",
    "MetricsLogger",
    "ProgressBar",
    "deterministic_view",
    "read_metrics",
]

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"
WANDB_MODES = ("disabled", "offline", "online")

#: Keys holding wall-clock dependent values; :func:`deterministic_view` removes them.
NONDETERMINISTIC_KEYS: frozenset[str] = frozenset(
    {"time", "wall_s", "elapsed_s", "step_time_s", "tok_s", "tokens_per_s", "mem_gb", "eta_s"}
)


def deterministic_view(
    record: dict[str, Any], drop: frozenset[str] | set[str] = NONDETERMINISTIC_KEYS
) -> dict[str, Any]:
    """Return ``record`` without the keys in ``drop`` (for cross-run comparisons)."""
    return {k: v for k, v in record.items() if k not in drop}


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Parse ``RUN_DIR/metrics.jsonl`` into a list of dicts (empty if the file is absent)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _new_run_id(wandb: Any) -> str:
    """A fresh wandb run id: wandb's own generator where this wandb version has one (it moved
    between releases), else 8 random lower-case letters and digits as wandb makes them."""
    for owner in (wandb, getattr(wandb, "util", None)):
        gen = getattr(owner, "generate_id", None)
        if callable(gen):
            return str(gen())
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _to_python(value: Any) -> Any:
    """Convert 0-d tensors / numpy scalars to plain python numbers for JSON."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


class MetricsLogger:
    """Per-step metrics to ``RUN_DIR/metrics.jsonl`` and (optionally) wandb, on rank 0 only.

    ``wandb_cfg`` keys: ``mode`` ('disabled' | 'offline' | 'online'), ``project``, ``name``,
    ``run_id`` (optional), ``config`` (dict). wandb is imported only when mode is not
    'disabled'. The wandb run id is stored in ``RUN_DIR/wandb_run_id.txt`` and reused with
    ``resume='allow'``, so a resumed run continues the same wandb run (an explicit ``run_id``
    takes precedence over the stored one). On ranks other than 0 every method is a no-op.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        rank: int,
        wandb_cfg: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.enabled = rank == 0
        self.path = self.run_dir / METRICS_FILE
        self._file: TextIO | None = None
        self._wandb: Any = None
        self.wandb_run: Any = None
        cfg = dict(wandb_cfg or {})
        mode = cfg.get("mode", "disabled")
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if mode != "disabled":
            self._init_wandb(mode, cfg)

    def _init_wandb(self, mode: str, cfg: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise RuntimeError(
                f"log.wandb={mode} needs the 'wandb' package: install it (pip install wandb) "
                "or set log.wandb=disabled"
            ) from e
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = cfg.get("run_id")
        if not run_id and id_file.exists():
            run_id = id_file.read_text().strip() or None
        if not run_id:
            run_id = _new_run_id(wandb)
        tmp = id_file.with_name(f".{WANDB_ID_FILE}.tmp-{os.getpid()}")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, id_file)
        self._wandb = wandb
        self.wandb_run = wandb.init(
            project=cfg.get("project"),
            name=cfg.get("name"),
            id=run_id,
            resume="allow",
            mode=mode,
            config=cfg.get("config"),
            dir=str(self.run_dir),
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one JSON line ``{'step': step, **metrics}`` (keys sorted, flushed) and send
        ``metrics`` to wandb at ``step``. Non-finite floats are written as NaN/Infinity."""
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError("metrics must not contain the key 'step' (pass it as `step`)")
        record = {k: _to_python(v) for k, v in metrics.items()}
        record["step"] = int(step)
        assert self._file is not None
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=int(step))

    def truncate_after(self, step: int) -> int:
        """Keep only lines with ``step <= step`` (dropping unparsable, e.g. half-written, lines);
        the file is rewritten atomically. Returns the number of lines removed."""
        if not self.enabled:
            return 0
        if self._file is not None:
            self._file.close()
        kept, removed = [], 0
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        ok = int(json.loads(line)["step"]) <= step
                    except (ValueError, KeyError, TypeError):
                        ok = False
                    if ok:
                        kept.append(line if line.endswith("\n") else line + "\n")
                    elif line.strip():
                        removed += 1
        tmp = self.path.with_name(f".{METRICS_FILE}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        return removed

    def close(self) -> None:
        """Close the file and finish the wandb run (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressBar:
    """Training progress: a tqdm bar on a TTY (unless ``tty=False``, i.e.
    ``log.progress=false``), otherwise a plain line every ``every`` steps (and at the last
    step), so a log file always gets step lines. ``enabled=False`` (ranks other than 0) makes
    it a no-op.

    ``update(step, ...)`` takes the number of steps completed so far (``initial`` on resume);
    ``write(line)`` prints a message without breaking the bar.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        every: int = 10,
        stream: TextIO | None = None,
        tty: bool = True,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.total, self.initial, self.enabled, self.every = total, initial, enabled, every
        self.stream = stream if stream is not None else sys.stdout
        self._t0 = time.monotonic()
        self._bar: Any = None
        self.is_tty = bool(enabled and tty and getattr(self.stream, "isatty", lambda: False)())
        if self.is_tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, file=self.stream, unit="step", dynamic_ncols=True
            )

    def update(
        self,
        step: int,
        loss: float | None = None,
        acc: float | None = None,
        tok_s: float | None = None,
    ) -> None:
        """Show progress at ``step`` completed steps with the given loss, accuracy, tokens/s."""
        if not self.enabled:
            return
        fields: dict[str, str] = {}
        if loss is not None:
            fields["loss"] = f"{float(loss):.4f}"
        if acc is not None:
            fields["acc"] = f"{float(acc):.3f}"
        if tok_s is not None:
            fields["tok/s"] = f"{float(tok_s):,.0f}"
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)
            self._bar.update(step - self._bar.n)
            return
        if step % self.every != 0 and step != self.total:
            return
        done = step - self.initial
        elapsed = time.monotonic() - self._t0
        eta = (self.total - step) * elapsed / done if done > 0 else float("nan")
        parts = [f"step {step}/{self.total}"] + [f"{k} {v}" for k, v in fields.items()]
        parts.append(f"eta {_fmt_duration(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """Print ``line`` above the bar (or plainly without one); a no-op when disabled."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the tqdm bar, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

"""Where a training step's time goes: ``torch.profiler`` over a range of steps
(``train.profile_steps: [first, last]``, the step numbers of metrics.jsonl, inclusive).

The trainer marks the phases of a step with ``record_function`` ranges named
``sleeptrain/<phase>``: ``data``, ``masks`` (the masks' target counts to the host),
``forward_backward``, ``reduce_clip``, ``prefetch`` (task data on CUDA: the next step's
batches, made while the GPU runs this step), ``sync`` (the step's one host sync: the host
waits there for the GPU) and ``optimizer``; they cost a few microseconds per step when no
profiler runs. After the last profiled step each rank writes into ``RUN_DIR/profile/``:

* ``trace_rank{R}.json``: the Chrome/Perfetto trace;
* ``summary_rank{R}.json``: per step the host wall time of each phase, the device kernels'
  count and summed time, and the kernels that took most device time (name, calls, total
  microseconds, share); on CPU runs the operators that took most CPU time instead;
* ``kernels_rank{R}.txt``: ``key_averages()`` as a table.

The profiled steps are slower than the others (the profiler's own cost); benchmarks time
other steps (``tools/bench_task.py --profile``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

__all__ = ["PHASES", "StepProfiler", "phase"]

#: the record_function ranges the trainer opens in each step, in order
PHASES = ("data", "masks", "forward_backward", "reduce_clip", "prefetch", "sync", "optimizer")


def phase(name: str) -> Any:
    """A ``record_function`` range named ``sleeptrain/<name>`` (one of :data:`PHASES`)."""
    return torch.profiler.record_function(f"sleeptrain/{name}")


class StepProfiler:
    """Starts ``torch.profiler`` before step ``first`` and writes the results after step
    ``last`` (1-based step numbers). ``steps`` empty: does nothing."""

    def __init__(self, steps: list[int] | tuple[int, ...], run_dir: Path,
                 device: torch.device, rank: int, say: Any = print) -> None:
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.out = Path(run_dir) / "profile"
        self.device, self.rank, self.say = device, rank, say
        self.prof: Any = None
        self.step_marks: list[tuple[int, Any]] = []

    @property
    def enabled(self) -> bool:
        return self.first > 0

    def step_context(self, step: int) -> Any:
        """Context for running step ``step``: starts the profiler at ``first``, marks each
        profiled step with a ``sleeptrain/step <n>`` range."""
        if not self.enabled or not (self.first <= step <= self.last):
            return nullcontext()
        if self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(ProfilerActivity.CUDA)
            self.prof = profile(activities=acts)
            self.prof.start()
        return torch.profiler.record_function(f"sleeptrain/step {step}")

    def after_step(self, step: int) -> None:
        """Stops and writes the results after step ``last`` (or a run ending inside the
        range: :meth:`close`)."""
        if self.prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof.stop()
        self.out.mkdir(parents=True, exist_ok=True)
        r = self.rank
        prof.export_chrome_trace(str(self.out / f"trace_rank{r}.json"))
        summary = summarize(prof.events(), self.device.type == "cuda")
        (self.out / f"summary_rank{r}.json").write_text(json.dumps(summary, indent=1))
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (self.out / f"kernels_rank{r}.txt").write_text(
            prof.key_averages().table(sort_by=key, row_limit=40))
        if r == 0:
            self.say(f"profile of steps {self.first}-{self.last} written to {self.out}: "
                     + summary_line(summary))


def _on_device(ev: Any) -> bool:
    """A GPU-timeline event: a kernel, a copy, or a user range's device-side mirror."""
    dt = getattr(ev, "device_type", None)
    return dt is not None and dt.name == "CUDA"


def _is_device_kernel(ev: Any) -> bool:
    """Device work (kernels, copies, memsets), not a user range mirrored onto the GPU
    timeline (``gpu_user_annotation``: ours, or torch's such as ``Optimizer.step#...``)."""
    return _on_device(ev) and not getattr(ev, "is_user_annotation", False) \
        and not ev.name.startswith("sleeptrain/")


def summarize(events: Any, cuda: bool, top: int = 25) -> dict[str, Any]:
    """Per profiled step: host wall time of each phase (ms), device kernels (count, summed
    ms); over all profiled steps: the top ``top`` kernels (CUDA) or CPU operators by time.

    A kernel counts for the last step whose host range began before the kernel started
    (the GPU runs behind the host: a step's last kernels may start after its range ends).
    """
    steps: list[dict[str, Any]] = []
    for ev in events:
        if ev.name.startswith("sleeptrain/step ") and not _on_device(ev):
            steps.append({"step": int(ev.name.split()[-1]), "t0": ev.time_range.start,
                          "t1": ev.time_range.end,
                          "wall_ms": (ev.time_range.end - ev.time_range.start) / 1e3,
                          "phases_ms": {}, "kernels": 0, "kernel_ms": 0.0})
    steps.sort(key=lambda s: s["t0"])

    def owner(t: float) -> dict[str, Any] | None:
        for s in steps:
            if s["t0"] <= t <= s["t1"]:
                return s
        return None

    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in events:
        name = ev.name
        if name.startswith("sleeptrain/"):
            if not name.startswith("sleeptrain/step ") and not _on_device(ev):
                s = owner(ev.time_range.start)
                if s is not None:
                    ph = name.split("/", 1)[1]
                    s["phases_ms"][ph] = round(s["phases_ms"].get(ph, 0.0) + (
                        ev.time_range.end - ev.time_range.start) / 1e3, 4)
            continue
        if cuda:
            if not _is_device_kernel(ev):
                continue
            dur = ev.time_range.end - ev.time_range.start
            # the step whose host range holds the kernel's start, else the last step that
            # began before it (the GPU runs behind the host)
            s = max((x for x in steps if x["t0"] <= ev.time_range.start),
                    key=lambda x: x["t0"], default=None)
            if s is not None:
                s["kernels"] += 1
                s["kernel_ms"] += dur / 1e3
        else:
            if getattr(ev, "cpu_parent", None) is not None and \
                    not ev.cpu_parent.name.startswith("sleeptrain/"):
                continue  # top-level operators only: no double counting of nested ones
            dur = ev.time_range.end - ev.time_range.start
        t = totals[name]
        t[0] += 1
        t[1] += dur
    grand = sum(v[1] for v in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    for s in steps:
        s["kernel_ms"] = round(s["kernel_ms"], 4)
        del s["t0"], s["t1"]
    return {"what": "CUDA kernels" if cuda else "top-level CPU operators",
            "steps": steps,
            "top": [{"name": n[:160], "calls": int(c), "total_us": round(us, 1),
                     "share": round(us / grand, 4)} for n, (c, us) in ranked]}


def summary_line(summary: dict[str, Any]) -> str:
    """One line: per-step wall and kernel time (medians), kernel count, the top entry."""
    steps = summary["steps"]
    if not steps:
        return "no step ranges recorded"
    import statistics

    wall = statistics.median(s["wall_ms"] for s in steps)
    kms = statistics.median(s["kernel_ms"] for s in steps)
    kn = statistics.median(s["kernels"] for s in steps)
    phases = {p: statistics.median(s["phases_ms"].get(p, 0.0) for s in steps) for p in PHASES}
    top = summary["top"][0] if summary["top"] else None
    return (f"step {wall:.2f} ms wall, " + ", ".join(f"{p} {v:.2f}" for p, v in phases.items())
            + (f"; {kn:.0f} kernels, {kms:.2f} ms kernel time" if summary["what"].startswith(
                "CUDA") else "")
            + (f"; top: {top['name'][:60]} {100 * top['share']:.1f}%" if top else ""))

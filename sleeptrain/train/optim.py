"""Optimizer construction: Muon for hidden-layer matrices, AdamW for everything else.

``build_optimizer`` splits named parameters into at most three groups:

* ``muon``: 2-D weights of hidden layers (see :func:`is_muon_param`), with weight decay;
* ``adamw`` with decay: every other parameter with ``ndim >= 2`` (token embedding, output head,
  convolution kernels -- the GDN short convolution's [channels, K] filter bank included -- and
  all matrices when ``use_muon=False``);
* ``adamw`` without decay: 1-D / 0-D parameters (norm gains, biases, ``A_log``, ``dt_bias``).

Both torch optimizers are wrapped in :class:`HybridOptimizer`, which behaves like one optimizer
for the trainer (step, zero_grad, param_groups, state_dict). All parameters given are included
regardless of ``requires_grad``: stage-wise freezing is done by setting ``requires_grad=False``;
a frozen parameter's ``.grad`` stays ``None`` (use ``zero_grad(set_to_none=True)``) and torch
optimizers skip parameters without a gradient, so their values and optimizer state are untouched
and the optimizer never needs rebuilding between stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from sleeptrain.parallel.tensors import gather_tp, partition_dim, shard_tp, tp_group_and_size

__all__ = [
    "DEFAULT_MUON_EXCLUDE",
    "HybridOptimizer",
    "TensorParallelMuon",
    "build_optimizer",
    "ShardedHybridOptimizer",
    "assign_owners",
    "optimizer_for",
    "is_muon_param",
    "uses_weight_decay",
]

#: Name substrings (matched case-insensitively) of 2-D weights that must not use Muon: the token
#: embedding and the output head are not hidden-layer linear maps, and neither is a convolution
#: kernel (the GDN short convolution's weight is 2-D, [channels, K], but each row is one
#: channel's K-tap filter: orthogonalizing the K columns of thousands of independent filters
#: is not the paper's "Muon for hidden matrices"; docs/design.md).
DEFAULT_MUON_EXCLUDE: tuple[str, ...] = ("embed", "head", "output_layer", "conv")

_KINDS = ("muon", "adamw")
_MUON_ADJUST = (None, "original", "match_rms_adamw")


def is_muon_param(
    name: str, p: torch.Tensor, exclude: tuple[str, ...] = DEFAULT_MUON_EXCLUDE
) -> bool:
    """Return True iff ``p`` is a 2-D hidden-layer weight that Muon should optimize.

    A parameter qualifies when ``p.ndim == 2`` and its lower-cased ``name`` contains none of the
    (lower-cased) substrings in ``exclude`` (by default the embedding, the output head and
    convolution kernels). Biases, norm gains, convolution kernels (2-D or 3-D), embeddings and
    the head therefore go to AdamW.
    """
    lowered = name.lower()
    return p.ndim == 2 and not any(s.lower() in lowered for s in exclude)


def uses_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Return True iff ``p`` gets weight decay: all tensors with ``ndim >= 2`` (matrices,
    embeddings, head, conv kernels); never 1-D/0-D ones (norm weights, biases, A_log, dt_bias).
    ``name`` is accepted for symmetry with :func:`is_muon_param` and is not used."""
    del name
    return p.ndim >= 2


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """Muon's quintic Newton-Schulz orthogonalization of a matrix, in bf16 (the same operations,
    in the same order, as ``torch.optim.Muon``)."""
    a, b, c = coefficients
    x = g.to(torch.bfloat16, copy=True)  # never an alias of a bf16 momentum buffer
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        upd = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, upd, x, beta=a)
    return x.T if tall else x


def muon_lr_scale(adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """Muon's learning-rate factor for a matrix of ``shape`` (as ``torch.optim.Muon``)."""
    a, b = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    return 1.0


class TensorParallelMuon(torch.optim.Muon):
    """``torch.optim.Muon`` whose orthogonalization sees the full matrix of a TP-split weight.

    Momentum is elementwise and stays local; the Nesterov update of a split weight is gathered
    over the TP group, orthogonalized whole, and each rank keeps its slice, so the step equals
    the single-device one (up to bf16 rounding of a row/column permutation). The learning-rate
    factor uses the full shape. A group's ``lr`` may be a 0-dim device tensor
    (``sleeptrain.train.optim_step``: the step then reads it from memory, as a captured CUDA
    graph needs). Without tensor parallelism it is ``torch.optim.Muon``'s step,
    operation for operation (tested); hyper-parameters and state (``momentum_buffer``) are its.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tp_group, tp, tp_rank = tp_group_and_size()
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                upd = p.grad.lerp(buf, mom) if group["nesterov"] else buf
                dim = partition_dim(p) if tp > 1 else None
                full = gather_tp(upd, dim, tp_group, tp)
                ortho = newton_schulz(full, group["ns_coefficients"], group["ns_steps"],
                                      group["eps"])
                ortho = shard_tp(ortho, dim, tp_rank, tp)
                scale = muon_lr_scale(group["adjust_lr_fn"], tuple(full.shape))
                if isinstance(lr, torch.Tensor):  # a device learning rate (CUDA graphs)
                    if group["weight_decay"]:
                        p.mul_(1 - lr * group["weight_decay"])
                    p.addcmul_(ortho, lr, value=-scale)
                    continue
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(ortho, alpha=-(lr * scale))
        return loss


class HybridOptimizer:
    """A Muon optimizer and an AdamW optimizer driven as one.

    Either part may be ``None`` (when its group would be empty). Every param group carries
    ``kind`` ('muon' | 'adamw'), ``base_lr`` (the peak learning rate; the schedule sets
    ``lr = base_lr * multiplier``, see ``sleeptrain.train.schedule.apply_lr``) and
    ``param_names``. ``state_dict()`` returns ``{'muon': sd | None, 'adamw': sd | None}``;
    loading restores the saved hyper-parameters too (torch semantics), after checking that the
    structure (groups, parameter counts, names, state tensor shapes) matches this optimizer.
    """

    def __init__(
        self, muon: torch.optim.Optimizer | None, adamw: torch.optim.Optimizer | None
    ) -> None:
        if muon is None and adamw is None:
            raise ValueError("HybridOptimizer needs at least one of muon / adamw")
        self.muon = muon
        self.adamw = adamw

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The underlying torch optimizers that exist (Muon first)."""
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """All param groups of both optimizers (the live dicts: editing 'lr' takes effect)."""
        return [g for o in self.optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; ``closure`` is evaluated once."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients of all parameters (``None`` by default, which freezing relies on)."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """``{'muon': ..., 'adamw': ...}``; a missing part is stored as ``None``."""
        return {
            "muon": None if self.muon is None else self.muon.state_dict(),
            "adamw": None if self.adamw is None else self.adamw.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict produced by :meth:`state_dict`; raise ValueError naming the first
        structural difference (missing part, group count, kind, parameter count, parameter
        name, or state tensor shape) before anything is modified."""
        if not isinstance(state_dict, dict) or set(state_dict) != set(_KINDS):
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict)
            raise ValueError(f"optimizer state must have keys ['adamw', 'muon'], got {got}")
        for kind in _KINDS:
            _validate_part(kind, getattr(self, kind), state_dict[kind])
        for kind in _KINDS:
            opt = getattr(self, kind)
            if opt is not None:
                opt.load_state_dict(state_dict[kind])

    def param_groups_summary(self) -> dict[str, int]:
        """Counts for logging: tensors and elements per kind, split by weight decay."""
        out: dict[str, int] = {}
        for g in self.param_groups:
            tag = f"{g['kind']}_{'decay' if g['weight_decay'] > 0 else 'nodecay'}"
            out[f"{tag}_tensors"] = out.get(f"{tag}_tensors", 0) + len(g["params"])
            out[f"{tag}_numel"] = out.get(f"{tag}_numel", 0) + sum(p.numel() for p in g["params"])
        out["total_tensors"] = sum(len(g["params"]) for g in self.param_groups)
        out["total_numel"] = sum(p.numel() for g in self.param_groups for p in g["params"])
        return out


def _validate_part(kind: str, opt: torch.optim.Optimizer | None, saved: Any) -> None:
    """Raise ValueError if the saved state of one part does not fit optimizer ``opt``."""
    if opt is None or saved is None:
        if (opt is None) != (saved is None):
            have = "no" if opt is None else "a"
            saved_has = "no" if saved is None else "a"
            raise ValueError(
                f"optimizer state mismatch: this optimizer has {have} {kind} part but the "
                f"saved state has {saved_has} {kind} part"
            )
        return
    if not isinstance(saved, dict) or "param_groups" not in saved or "state" not in saved:
        raise ValueError(f"saved {kind} optimizer state lacks 'param_groups'/'state'")
    groups, saved_groups = opt.param_groups, saved["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"{kind} optimizer: saved state has {len(saved_groups)} param groups, "
            f"this optimizer has {len(groups)}"
        )
    for i, (g, sg) in enumerate(zip(groups, saved_groups, strict=True)):
        where = f"{kind} optimizer group {i}"
        if sg.get("kind", kind) != g["kind"]:
            raise ValueError(f"{where}: saved kind {sg.get('kind')!r} != {g['kind']!r}")
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(
                f"{where}: saved state has {len(sg['params'])} parameters, "
                f"this optimizer has {len(g['params'])}"
            )
        names, saved_names = g.get("param_names"), sg.get("param_names")
        if names is not None and saved_names is not None and names != saved_names:
            j = next(k for k, (a, b) in enumerate(zip(names, saved_names, strict=True)) if a != b)
            raise ValueError(
                f"{where}: parameter {j} is {names[j]!r} here but {saved_names[j]!r} in the "
                "saved state"
            )
        labels = names or [None] * len(g["params"])
        for pid, p, pname in zip(sg["params"], g["params"], labels, strict=True):
            for key, val in saved["state"].get(pid, {}).items():
                if isinstance(val, torch.Tensor) and val.ndim > 0 and val.shape != p.shape:
                    label = pname if pname is not None else f"#{pid}"
                    raise ValueError(
                        f"{where}: state {key!r} of parameter {label} has shape "
                        f"{tuple(val.shape)}, parameter has shape {tuple(p.shape)}"
                    )


def _check_hyperparameters(muon_lr: float, adamw_lr: float, adamw_eps: float,
                           weight_decay: float, adamw_betas: tuple[float, float],
                           muon_momentum: float, muon_ns_steps: int,
                           muon_adjust_lr: str | None) -> None:
    """ValueError naming the first hyper-parameter out of its range."""
    for arg, val in (("muon_lr", muon_lr), ("adamw_lr", adamw_lr), ("adamw_eps", adamw_eps)):
        if not (math.isfinite(val) and val >= 0):
            raise ValueError(f"{arg} must be a finite number >= 0, got {val}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if len(adamw_betas) != 2 or not all(0.0 <= b < 1.0 for b in adamw_betas):
        raise ValueError(f"adamw_betas must be two numbers in [0, 1), got {adamw_betas}")
    if not 0.0 <= muon_momentum < 1.0:
        raise ValueError(f"muon_momentum must be in [0, 1), got {muon_momentum}")
    if muon_ns_steps < 1:
        raise ValueError(f"muon_ns_steps must be >= 1, got {muon_ns_steps}")
    if muon_adjust_lr not in _MUON_ADJUST:
        raise ValueError(f"muon_adjust_lr must be one of {_MUON_ADJUST}, got {muon_adjust_lr!r}")


Named = list[tuple[str, nn.Parameter]]


def _split_params(named_params: Iterable[tuple[str, nn.Parameter]], use_muon: bool,
                  muon_exclude: tuple[str, ...]) -> tuple[Named, Named, Named]:
    """(Muon's, AdamW's with decay, AdamW's without decay) parameters, each once."""
    muon_p: Named = []
    decay_p: Named = []
    nodecay_p: Named = []
    seen: set[int] = set()
    for name, p in named_params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if use_muon and is_muon_param(name, p, muon_exclude):
            muon_p.append((name, p))
        elif uses_weight_decay(name, p):
            decay_p.append((name, p))
        else:
            nodecay_p.append((name, p))
    if not seen:
        raise ValueError("build_optimizer got no parameters")
    return muon_p, decay_p, nodecay_p


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    muon_lr: float,
    adamw_lr: float,
    weight_decay: float,
    adamw_betas: tuple[float, float],
    adamw_eps: float,
    muon_momentum: float,
    muon_nesterov: bool = True,
    muon_ns_steps: int = 5,
    muon_adjust_lr: str | None = "match_rms_adamw",
    use_muon: bool = True,
    fused: bool | None = None,
    muon_exclude: tuple[str, ...] = DEFAULT_MUON_EXCLUDE,
) -> HybridOptimizer:
    """Build the Muon + AdamW optimizer over ``named_params`` (all of them, frozen or not).

    Groups and weight decay follow :func:`is_muon_param` and :func:`uses_weight_decay`;
    ``use_muon=False`` sends every parameter to AdamW. A parameter given twice (tied weights
    under two names) is included once, under its first name. ``muon_adjust_lr`` is passed to
    Muon (:class:`TensorParallelMuon`) as ``adjust_lr_fn`` ('match_rms_adamw' scales the lr by
    ``0.2*sqrt(max(A, B))`` so AdamW-like learning rates apply; 'original'/None by
    ``sqrt(max(1, A/B))``). ``fused=None`` uses the fused AdamW kernel iff every AdamW parameter
    is on CUDA, else the foreach implementation.
    """
    _check_hyperparameters(muon_lr, adamw_lr, adamw_eps, weight_decay, adamw_betas,
                           muon_momentum, muon_ns_steps, muon_adjust_lr)
    muon_p, decay_p, nodecay_p = _split_params(named_params, use_muon, muon_exclude)

    muon = None
    if muon_p:
        muon = TensorParallelMuon(
            [{"params": muon_p, "kind": "muon", "base_lr": muon_lr}],
            lr=muon_lr,
            weight_decay=weight_decay,
            momentum=muon_momentum,
            nesterov=muon_nesterov,
            ns_steps=muon_ns_steps,
            adjust_lr_fn=muon_adjust_lr,
        )

    adamw = None
    adamw_groups = [
        {"params": ps, "kind": "adamw", "base_lr": adamw_lr, "weight_decay": wd,
         "decay": decay}  # decay: which group (kept when weight_decay is 0; checkpoints)
        for ps, wd, decay in ((decay_p, weight_decay, True), (nodecay_p, 0.0, False))
        if ps
    ]
    if adamw_groups:
        all_cuda = all(p.is_cuda for _, p in decay_p + nodecay_p)
        use_fused = all_cuda if fused is None else fused
        adamw = torch.optim.AdamW(
            adamw_groups,
            lr=adamw_lr,
            betas=(float(adamw_betas[0]), float(adamw_betas[1])),
            eps=adamw_eps,
            weight_decay=weight_decay,
            fused=use_fused,
            foreach=None if use_fused else True,
            # graph-safe (device step counters; the fused kernel's math is the same either
            # way): sleeptrain.train.optim_step may capture the step as a CUDA graph
            capturable=use_fused,
        )
    return HybridOptimizer(muon, adamw)



class ShardedHybridOptimizer(HybridOptimizer):
    """:class:`HybridOptimizer` with its state sharded over the data-parallel group (ZeRO
    stage 1, what megatron-core's distributed optimizer does for the optimizer state).

    Every parameter has one owning DP rank (greedy balance of element counts, the same on
    every rank and every TP rank, so a TP group's ranks own the same parameters and
    TensorParallelMuon's gather still meets). A rank keeps optimizer state for, and updates,
    only the parameters it owns: ``step`` hides the other gradients from the two optimizers
    (torch optimizers skip parameters without a gradient), then every updated parameter is
    broadcast from its owner, coalesced per owner and dtype. Gradients are still all-reduced
    before the step (the trainer does that), so clipping sees the full gradient. Param groups
    are those of the unsharded optimizer (all parameters), so checkpoints carry the same
    layout and load into either kind at any DP size (``sleeptrain.train.dist_ckpt``).
    """

    sharded = True

    def __init__(self, inner: HybridOptimizer, owner: dict[int, int], group: Any,
                 dp_rank: int) -> None:
        super().__init__(inner.muon, inner.adamw)
        self.owner = owner  # id(param) -> owning DP rank
        self.group = group
        self.dp_rank = dp_rank
        self._params = [p for g in self.param_groups for p in g["params"]]
        # the broadcasts after a step: per owner and dtype, in the same order on every rank
        buckets: dict[tuple[int, str], list[torch.Tensor]] = {}
        for p in self._params:
            buckets.setdefault((owner[id(p)], str(p.dtype)), []).append(p)
        self._buckets = sorted(buckets.items())

    def owns(self, p: torch.Tensor) -> bool:
        return self.owner[id(p)] == self.dp_rank

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        import torch.distributed as dist

        hidden = {}
        for p in self._params:
            if p.grad is not None and not self.owns(p):
                hidden[id(p)] = p.grad
                p.grad = None
        try:
            loss = super().step(closure)
        finally:
            for p in self._params:
                if id(p) in hidden:
                    p.grad = hidden[id(p)]
        for (rank, _), ps in self._buckets:
            flat = torch.cat([p.detach().reshape(-1) for p in ps])
            dist.broadcast(flat, src=dist.get_global_rank(self.group, rank), group=self.group)
            if rank != self.dp_rank:
                off = 0
                for p in ps:
                    p.copy_(flat[off:off + p.numel()].view_as(p))
                    off += p.numel()
        return loss


def assign_owners(named: list[tuple[str, torch.Tensor]], dp_size: int) -> dict[int, int]:
    """id(param) -> owning DP rank: largest first to the least-loaded rank (ties: lower rank),
    order by (-numel, name) so that every rank computes the same assignment."""
    load = [0] * dp_size
    owner: dict[int, int] = {}
    seen: set[int] = set()
    uniq = []
    for n, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            uniq.append((n, p))
    for _, p in sorted(uniq, key=lambda np_: (-np_[1].numel(), np_[0])):
        r = min(range(dp_size), key=lambda i: (load[i], i))
        owner[id(p)] = r
        load[r] += p.numel()
    return owner


def optimizer_for(cfg: DictConfig, model: nn.Module) -> HybridOptimizer:
    """The optimizer a run's config (``cfg.optim``, ``cfg.parallel.shard_optimizer``) builds
    for ``model``: the trainer's, and the one a checkpoint's optimizer state is loaded into
    elsewhere (``tools/convert.py reshard``). With ``shard_optimizer`` and more than one
    data-parallel rank: a :class:`ShardedHybridOptimizer` over megatron-core's DP group."""
    o = cfg.optim
    opt = build_optimizer(
        model.named_parameters(), muon_lr=o.muon_lr, adamw_lr=o.adamw_lr,
        weight_decay=o.weight_decay, adamw_betas=tuple(o.adamw_betas), adamw_eps=o.adamw_eps,
        muon_momentum=o.muon_momentum, use_muon=o.use_muon, muon_adjust_lr=o.muon_adjust_lr)
    if not cfg.parallel.shard_optimizer:
        return opt
    from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        return opt
    dp = mpu.get_data_parallel_world_size()
    if dp == 1:
        return opt
    owner = assign_owners(list(model.named_parameters()), dp)
    return ShardedHybridOptimizer(opt, owner, mpu.get_data_parallel_group(),
                                  mpu.get_data_parallel_rank())

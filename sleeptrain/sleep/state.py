"""What crosses window boundaries: the fast weights, the conv state and the KV carry."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sleeptrain.model.hybrid import HybridModel


@dataclass
class SleepState:
    """What crosses window boundaries, per block index (None where a block has no such state).

    fast: GDN fast weights S [B, HV, d_k, d_v] (fp32; fp64 for fp64 models);
    conv: GDN conv state [B, C, K-1] (sliding eviction only);
    kv:   attention KV carry (k, v) [B, c, Hkv, D] of the last c <= L-1 tokens (sliding only);
    position: number of tokens consumed so far (the global position of the next token).
    """

    fast: list[torch.Tensor | None]
    conv: list[torch.Tensor | None]
    kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    position: int = 0

    def detach(self) -> SleepState:
        """The same state cut from the autograd graph."""
        return SleepState(
            fast=[None if s is None else s.detach() for s in self.fast],
            conv=[None if c is None else c.detach() for c in self.conv],
            kv=[None if kv is None else (kv[0].detach(), kv[1].detach()) for kv in self.kv],
            position=self.position,
        )

    def tensors(self) -> list[torch.Tensor]:
        """All tensors of the state, in a fixed order."""
        out: list[torch.Tensor] = [s for s in self.fast if s is not None]
        out += [c for c in self.conv if c is not None]
        for kv in self.kv:
            if kv is not None:
                out += [kv[0], kv[1]]
        return out


def initial_state(net: HybridModel, batch_size: int,
                  device: torch.device | str | None = None) -> SleepState:
    """The state at the start of a sequence: zero fast weights, empty conv state and KV."""
    device = net.device if device is None else device
    sdt = torch.float64 if net.dtype == torch.float64 else torch.float32
    fast: list[torch.Tensor | None] = []
    for b in net.blocks:
        if b.kind == "gdn" and b.mixer is not None:  # None: another pipeline stage's
            m = b.mixer
            fast.append(torch.zeros(batch_size, m.hv_local, m.dk, m.dv, dtype=sdt,
                                    device=device))
        else:
            fast.append(None)
    n = net.depth
    return SleepState(fast=fast, conv=[None] * n, kv=[None] * n, position=0)


__all__ = ["SleepState", "initial_state"]

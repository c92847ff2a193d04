"""Hard-concrete gates: the gate parameters of a big student and the training draw.

Gates follow Louizos et al., "Learning Sparse Neural Networks through L0 Regularization": per
channel ``u ~ U(0,1)``, ``s = sigmoid((log u - log(1-u) + log_alpha) / beta)``,
``g = clamp(s (zeta - gamma) + gamma, 0, 1)``; at eval ``g = clamp(sigmoid(log_alpha)(zeta -
gamma) + gamma, 0, 1)``, deterministic. ``HardConcreteGates`` holds one ``log_alpha`` vector per
widened group and draws one realisation per sample for all of them at once; where those values
are multiplied in is ``graphmerge.passes.gate``'s business.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from graphmerge.passes.errors import GraphMergeError
from torch import nn

#: the gates' buffer of explicit training uniforms (None: drawn in the forward)
UNIFORM = "uniform"


class HardConcreteGates(nn.Module):
    """All gate parameters of a big student: ``log_alpha`` per widened group, N × width each."""

    def __init__(self, sizes: dict[int, int], *, beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1,
                 init_mean: float = 1.0, init_std: float = 0.01, generator: torch.Generator | None = None):
        super().__init__()
        if not (gamma < 0 < 1 < zeta) or beta <= 0:
            raise GraphMergeError(f"hard-concrete constants need gamma < 0, zeta > 1 and beta > 0; got "
                                  f"beta={beta}, gamma={gamma}, zeta={zeta}.")
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self.group_ids = list(sizes)
        self.log_alpha = nn.ParameterDict({
            f"g{gid}": nn.Parameter(torch.randn(size, generator=generator) * init_std + init_mean)
            for gid, size in sizes.items()
        })
        offsets = np.cumsum([0, *sizes.values()])
        self.offsets = {gid: int(o) for gid, o in zip(sizes, offsets[:-1], strict=True)}
        self.total = int(offsets[-1])
        # None: a training forward draws its uniforms with torch.rand. A (rows x total) tensor: the
        # uniforms it uses instead (a functional trainer passes one per stacked model through
        # torch.func.functional_call; see GatedStudent.gate_noise_name)
        self.register_buffer(UNIFORM, None, persistent=False)

    def all_log_alpha(self) -> torch.Tensor:
        if not self.group_ids:
            return torch.zeros(0)
        return torch.cat([self.log_alpha[f"g{gid}"] for gid in self.group_ids])

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        """Gate values for every channel plus a trailing 1 (for positions no gate covers): in training
        ``hard_concrete_sample`` of one realisation per row (per sample of ``reference``), in eval
        the deterministic gate."""
        log_alpha = self.all_log_alpha()
        if self.training:
            rows = reference.shape[0] if reference.ndim else 1
            uniform = getattr(self, UNIFORM)
            if uniform is None:  # its own draw, clamped in place: one (rows x channels) allocation fewer
                uniform = torch.rand(rows, self.total, device=log_alpha.device, dtype=log_alpha.dtype)
                gates = _hard_concrete(log_alpha, uniform.clamp_(1e-6, 1 - 1e-6), self.beta, self.gamma, self.zeta)
            elif tuple(uniform.shape) != (rows, self.total):
                raise GraphMergeError(f"the gates' uniforms have shape {tuple(uniform.shape)}, but this forward "
                                      f"needs ({rows}, {self.total}): one row per sample of the batch, one column "
                                      "per gate. Pass uniforms drawn for this batch, or None to draw them here.")
            else:
                gates = hard_concrete_sample(log_alpha, uniform, beta=self.beta, gamma=self.gamma, zeta=self.zeta)
        else:
            gates = torch.sigmoid(log_alpha).unsqueeze(0).mul(self.zeta - self.gamma).add_(self.gamma).clamp(0, 1)
        return torch.cat([gates, torch.ones(gates.shape[0], 1, dtype=gates.dtype, device=gates.device)], 1)

    def prob_open(self, gid: int) -> torch.Tensor:
        """P[g > 0] per channel: sigmoid(log_alpha - beta log(-gamma / zeta))."""
        return torch.sigmoid(self.log_alpha[f"g{gid}"] - self.open_shift)

    def eval_value(self, gid: int) -> torch.Tensor:
        return (torch.sigmoid(self.log_alpha[f"g{gid}"]) * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    @property
    def open_shift(self) -> float:
        """``beta log(-gamma / zeta)``: P[g > 0] = sigmoid(log_alpha - open_shift)."""
        return self.beta * math.log(-self.gamma / self.zeta)

    def segments(self) -> torch.Tensor:
        """For each entry of :meth:`all_log_alpha`, the position of its group in ``group_ids``."""
        sizes = [self.log_alpha[f"g{gid}"].numel() for gid in self.group_ids]
        return torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes, dtype=torch.long))

    @torch.no_grad()
    def set_all_log_alpha(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` (laid out as :meth:`all_log_alpha`) into the groups' parameters."""
        for gid in self.group_ids:
            param = self.log_alpha[f"g{gid}"]
            start = self.offsets[gid]
            param.copy_(flat[start:start + param.numel()])


def hard_concrete_sample(log_alpha: torch.Tensor, uniform: torch.Tensor, *, beta: float = 2 / 3,
                         gamma: float = -0.1, zeta: float = 1.1) -> torch.Tensor:
    """Hard-concrete gate values ``clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) (zeta -
    gamma) + gamma, 0, 1)``, ``u`` = ``uniform`` clamped to [1e-6, 1 - 1e-6]: one realisation per
    row of ``uniform`` (rows x channels; not modified) for ``log_alpha`` (channels), differentiable
    in ``log_alpha``. ``HardConcreteGates.forward`` draws with it (its own uniforms clamped in
    place); so can a functional trainer (``torch.func.vmap`` over stacked models) with noise it
    draws itself."""
    return _hard_concrete(log_alpha, uniform.clamp(1e-6, 1 - 1e-6), beta, gamma, zeta)


def _hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor, beta: float, gamma: float, zeta: float) -> torch.Tensor:
    """``hard_concrete_sample`` on clamped uniforms ``u``, which it overwrites."""
    # log u - log1p(-u) in place on the temporaries, where no gradient flows (each one is a rows x
    # channels allocation per step). Not noise.add_(log_alpha): under vmap log_alpha may be batched
    # where the noise is not. (One hand-written autograd Function for the whole draw measured
    # slower, not faster: 1.21 vs 1.16 x the widened step on mnist1d_cnn, 150 interleaved rounds.)
    noise = torch.log(u)
    noise.sub_(u.neg_().log1p_())
    s = torch.sigmoid(torch.add(noise, log_alpha).div_(beta))
    return s.mul(zeta - gamma).add_(gamma).clamp(0, 1)

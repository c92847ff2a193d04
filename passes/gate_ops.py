"""The graph ops a gated big student calls: gathering gate values and multiplying them in.

``add_gates`` inserts one ``gather_gate_values`` per forward and one ``apply_gate`` per gated
activation; both are ``torch.fx.wrap``-ed so that a gated graph traced again keeps them as calls.
"""

from __future__ import annotations

import torch
import torch.fx


@torch.fx.wrap
def apply_gate(x: torch.Tensor, gates: torch.Tensor, index: torch.Tensor, dim: int,
               values: torch.Tensor | None = None, batch: tuple[int, int, int] | None = (0, 1, 1)) -> torch.Tensor:
    """Multiply ``x`` along ``dim`` by the gate values ``gates[:, index]``, sample by sample.

    ``values`` (rows x channels), when given, is that gather done already (``add_gates`` gathers
    every site's values in one :func:`gather_gate_values` per forward); ``gates`` and ``index`` then
    only name the site. Row ``b`` is sample ``b``'s realisation (one row: every sample's). ``batch``
    is where the samples sit in ``x`` (``graphmerge.passes.batch.BatchPlace``): dim ``batch[0]``
    holds ``outer * B * inner`` positions, viewed as ``(outer, B, inner)``; None: the site's batch
    could not be located and every sample takes row 0's realisation. ``values`` may also hold one
    value per run of ``x.shape[dim] / values.shape[1]`` consecutive positions (a flattened
    ``C x L`` input whose ``L`` positions share their channel's gate).
    """
    if values is None:
        values = gates.index_select(1, index)
    if batch is None:
        values = values[:1]
    rows, channels = values.shape
    d = dim % x.ndim
    view, sample = x, None
    if rows > 1:
        sample, outer, inner = batch
        sample %= x.ndim
        if outer != 1 or inner != 1:
            view = view.unflatten(sample, (outer, -1, inner))
            d += 2 if d > sample else 0
            sample += 1
    if channels != view.shape[d]:
        view = view.unflatten(d, (channels, -1))
        if sample is not None and sample > d:
            sample += 1
    shape = [1] * view.ndim
    shape[d] = channels
    if sample is not None:
        shape[sample] = rows
        values = values if sample < d else values.t()
    # in x's dtype: under bf16 autocast a float32 product would be cast back by the consumer
    out = view * values.reshape(shape).to(x.dtype)
    return out if view is x else out.reshape(x.shape)


@torch.fx.wrap
def gather_gate_values(gates: torch.Tensor, index: torch.Tensor | None, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """``gates[:, index]`` split into runs of ``sizes``: every gate site's values in one gather.

    One ``index_select`` instead of one per site: its backward scatters into one zero-filled
    (rows x all gates) gradient instead of one per site, which autograd would then add up.
    ``index=None``: the runs are the gates in order (``index`` would be ``0, 1, ..., sum(sizes) - 1``),
    taken as views (``narrow`` and ``split``), whose backward is one concatenation.
    """
    if index is None:
        values = gates.narrow(1, 0, sum(sizes))
    else:
        values = gates.index_select(1, index)
    return (values,) if len(sizes) == 1 else values.split(sizes, 1)

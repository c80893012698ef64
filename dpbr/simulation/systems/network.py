"""Lossy links: messages cut into packets, each packet lost independently (:func:`transmit`).

AggregaThor (Damaskinos, El Mhamdi, Guerraoui, Guirguis, Rouault 2019, "AggregaThor: Byzantine
machine learning via robust gradient aggregation", SysML 2019) can send the workers' gradients over
UDP instead of TCP: lost packets are not retransmitted, and the robust aggregation rule is left to
cope with the damaged gradients. This module models such a link, with no retransmission and no
reordering:

* a message of ``d`` values is cut into ``P = ⌈d / q⌉`` consecutive packets of ``q =
  ⌊packet_bytes / bytes_per_value⌋`` values (the last one shorter): packet ``j`` carries coordinates
  ``j·q … min((j+1)·q, d) − 1`` (:func:`~dpbr.simulation.systems.costs.packet_count`);
* each packet is lost independently with probability ``p`` (``drop``):
  ``L_{ij} ~ Bernoulli(p)``, drawn as ``U_{ij} < p`` with ``U`` a ``(k, P)`` float64 tensor of
  uniforms from the caller's generator, in row-major order (message ``i``, then packet ``j``);
* what the receiver makes of a lost packet is the ``fill`` policy (:data:`FILLS`): its coordinates
  read 0 (``"zero"``) or NaN (``"nan"``, for rules that skip missing coordinates), or the whole
  message is dropped (``"lost"``).

The fill policies are dpbr's modelling choices, not a description of AggregaThor's transport.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from dpbr.errors import UsageError
from dpbr.simulation.systems.costs import LinkModel, packet_count

__all__ = ["FILLS", "Delivery", "packet_count", "transmit"]

#: What a lost packet becomes at the receiver (:func:`transmit`).
FILLS: tuple[str, ...] = ("zero", "nan", "lost")


class Delivery(NamedTuple):
    """What the receivers get from :func:`transmit` (all tensors on the input's device).

    Attributes
    ----------
    values:
        ``(k, d)`` received vectors, the input's dtype; always a new tensor. Coordinates of lost
        packets are 0 (``fill="zero"``) or NaN (``fill="nan"``); with ``fill="lost"`` a message that
        lost any packet has its whole row NaN (and ``delivered`` False), the others are intact.
    delivered:
        ``(k,)`` bool: whether message ``i`` counts as received. False only with ``fill="lost"``.
    packets_lost:
        ``(k,)`` int64: packets of message ``i`` that were lost.
    packets:
        Packets per message, ``P = ⌈d / q⌉``.
    lost_mask:
        ``(k, P)`` bool: ``lost_mask[i, j]`` is True when packet ``j`` of message ``i`` was lost.
    """

    values: Tensor
    delivered: Tensor
    packets_lost: Tensor
    packets: int
    lost_mask: Tensor


def transmit(
    vectors: Tensor,
    drop: float,
    *,
    link: LinkModel | None = None,
    fill: str = "zero",
    generator: torch.Generator | None = None,
) -> Delivery:
    """Send ``k`` messages of ``d`` values each over a link that loses each packet with probability ``drop``.

    .. math::

        L_{ij} = [U_{ij} < p], \\quad U_{ij} \\sim \\mathcal U[0, 1) \\text{ i.i.d.}, \\qquad
        \\tilde x_{ic} = \\begin{cases} \\text{fill} & L_{i,\\lfloor c/q \\rfloor} \\\\
                                    x_{ic} & \\text{otherwise} \\end{cases}

    (see the module docstring; AggregaThor, Damaskinos et al., SysML 2019, for UDP gradient transfers).

    Parameters
    ----------
    vectors:
        ``(k, d)`` floating-point tensor (any float dtype, CPU or CUDA): row ``i`` is message ``i``.
        Never modified.
    drop:
        Packet loss probability ``p`` in ``[0, 1]``. With ``p = 0`` nothing is drawn (the generator
        is left untouched) and the values arrive unchanged (as a copy).
    link:
        Packet size and bytes per value (:class:`~dpbr.simulation.systems.costs.LinkModel`; default
        ``LinkModel()``: 368 float32 values per packet).
    fill:
        One of :data:`FILLS`: ``"zero"``, ``"nan"`` or ``"lost"`` (see :class:`Delivery`).
    generator:
        The only source of randomness, required when ``p > 0``. The ``k · P`` uniforms are drawn on
        the generator's device, in one call, in row-major order, so the same generator state gives the
        same lost packets whatever ``fill`` is (the mask is then moved to ``vectors.device``).

    Raises
    ------
    dpbr.errors.UsageError
        (a ``ValueError``) for ``drop`` outside ``[0, 1]`` or an unknown ``fill``; ``ValueError`` for a
        tensor that is not 2-D floating point, or a missing generator with ``p > 0``.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> out = transmit(torch.ones(2, 1000), 1.0, fill="zero", generator=g)
    >>> out.packets, out.packets_lost.tolist(), out.values.abs().sum().item()
    (3, [3, 3], 0.0)
    """
    if fill not in FILLS:
        raise UsageError("fill", f"{fill!r} is unknown; allowed: {', '.join(FILLS)}")
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not (math.isfinite(drop) and 0 <= drop <= 1):
        raise UsageError("drop", f"must be a probability in [0, 1], got {drop!r}")
    if not isinstance(vectors, Tensor) or vectors.dim() != 2 or not vectors.is_floating_point():
        raise ValueError("transmit: vectors must be a 2-D floating-point tensor (k messages, d values)")
    link = LinkModel() if link is None else link
    k, d = vectors.shape
    packets = packet_count(d, link)
    device = vectors.device
    if drop == 0:
        return Delivery(values=vectors.clone(), delivered=torch.ones(k, dtype=torch.bool, device=device),
                        packets_lost=torch.zeros(k, dtype=torch.int64, device=device), packets=packets,
                        lost_mask=torch.zeros(k, packets, dtype=torch.bool, device=device))
    if generator is None:
        raise ValueError("transmit: a generator (torch.Generator) is required when drop > 0")
    uniforms = torch.rand((k, packets), generator=generator, device=generator.device, dtype=torch.float64)
    lost = (uniforms < drop).to(device)
    packets_lost = lost.sum(dim=1, dtype=torch.int64)
    if fill == "lost":
        delivered = packets_lost == 0
        values = vectors.masked_fill(~delivered.unsqueeze(1), math.nan)
        return Delivery(values=values, delivered=delivered, packets_lost=packets_lost, packets=packets,
                        lost_mask=lost)
    q = link.values_per_packet  # coordinate c belongs to packet c // q: repeat each packet's flag q times
    lost_values = lost.unsqueeze(2).expand(k, packets, q).reshape(k, packets * q)[:, :d]
    values = vectors.masked_fill(lost_values, 0.0 if fill == "zero" else math.nan)
    return Delivery(values=values, delivered=torch.ones(k, dtype=torch.bool, device=device),
                    packets_lost=packets_lost, packets=packets, lost_mask=lost)

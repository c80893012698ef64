"""What one training step costs on a simulated network: messages, bytes, rounds and seconds.

Plain Python (no torch): the workflow plans runs with it before any tensor exists.

The model
---------
A step is ``compute_per_worker`` mini-batch gradient computations by every worker (in parallel),
followed by synchronous communication *rounds* (:class:`Transfer`): in a round, every sender sends
its messages (each a vector of ``values_per_message`` numbers) and every receiver waits for all of
them before the next round starts. A round takes

.. math::

    t_{\\text{round}} = \\ell + \\frac{\\max(m_{\\text{in}}, m_{\\text{out}}) \\cdot v \\cdot b}{B}

where ``ℓ`` is the one-way latency (:attr:`LinkModel.latency_s`), ``m_in`` / ``m_out`` the largest
number of messages a single node receives / sends in the round, ``v`` the values per message, ``b``
the bytes per value and ``B`` the bandwidth of one node's network card (full duplex: sending and
receiving do not compete). A step takes

.. math::

    t_{\\text{step}} = c \\cdot t_{\\text{grad}} + \\sum_{\\text{rounds}} t_{\\text{round}} + t_{\\text{server}}

with ``c`` gradient computations per worker, ``t_grad`` = :attr:`LinkModel.compute_s` and
``t_server`` an optional term for what the model leaves out (aggregation, decoding).

Assumptions (stated so the numbers are read for what they are): synchronous rounds; every sender is
linked directly to every receiver (a star or a complete bipartite graph); each node's network card is
the only bottleneck (no switch congestion, no contention beyond the busiest card, which serialises its
messages); no retransmission (lost packets are lost, as over UDP in the lossy mode of AggregaThor:
Damaskinos, El Mhamdi, Guerraoui, Guirguis, Rouault 2019, "AggregaThor: Byzantine machine learning
via robust gradient aggregation", SysML 2019); bytes are payload bytes (no packet headers); the time
a server spends aggregating or decoding is not modelled (pass it as ``server_seconds``). The
parameter-server and multi-server protocols composed from these rounds are those of AggregaThor and
of GuanYu (El Mhamdi, Guerraoui, Guirguis, Rouault 2019, "SGD: Decentralized Byzantine resilience",
arXiv 1905.03853).

Example
-------
The single trusted parameter server: one broadcast of the model to ``n`` workers, one gather of
their gradients (2 rounds, ``2n`` messages):

>>> link = LinkModel(latency_s=1e-4, bandwidth_bytes_per_s=1e6)
>>> cost = step_cost(1, 11, [("servers", broadcast(1, 11, values=1000)),
...                          ("workers", gather(11, 1, values=1000))], link)
>>> cost.rounds, cost.messages, cost.bytes_workers, round(cost.step_seconds, 6)
(2, 22, 44000, 0.0882)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

from dpbr.errors import UsageError

__all__ = [
    "COST_COLUMNS",
    "SENDERS",
    "LinkModel",
    "StepCost",
    "Transfer",
    "broadcast",
    "exchange",
    "gather",
    "packet_count",
    "round_seconds",
    "step_cost",
]

#: Who sends in a round of :func:`step_cost`: the bytes are attributed to that side.
SENDERS: tuple[str, ...] = ("workers", "servers")


def _check_float(option: str, value: object, *, positive: bool) -> None:
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(option, f"must be a finite number {bound}, got {value!r}")
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise UsageError(option, f"must be a finite number {bound}, got {value!r}")


def _check_int(option: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(option, f"must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class LinkModel:
    """The network and the workers' speed, as :func:`round_seconds` and :func:`step_cost` see them.

    Parameters
    ----------
    latency_s:
        One-way latency of a message round, in seconds (finite, ``>= 0``).
    bandwidth_bytes_per_s:
        Bandwidth of one node's network card, per direction (full duplex), in bytes per second
        (finite, ``> 0``); the default 1.25e9 is 10 Gbit/s.
    compute_s:
        Seconds one worker takes to compute one mini-batch gradient (finite, ``>= 0``; 0 = not modelled).
    bytes_per_value:
        Bytes of one transmitted number (integer ``>= 1``; 4 = float32).
    packet_bytes:
        Payload bytes of one packet (integer ``>= bytes_per_value``; 1472 = the UDP payload of a
        1500-byte Ethernet MTU). A value is never split across packets, so a packet carries
        :attr:`values_per_packet` values.

    Raises
    ------
    dpbr.errors.UsageError
        (a ``ValueError``) naming the field when a value is out of range.
    """

    latency_s: float = 1e-4
    bandwidth_bytes_per_s: float = 1.25e9
    compute_s: float = 0.0
    bytes_per_value: int = 4
    packet_bytes: int = 1472

    def __post_init__(self) -> None:
        _check_float("latency_s", self.latency_s, positive=False)
        _check_float("bandwidth_bytes_per_s", self.bandwidth_bytes_per_s, positive=True)
        _check_float("compute_s", self.compute_s, positive=False)
        _check_int("bytes_per_value", self.bytes_per_value, 1)
        _check_int("packet_bytes", self.packet_bytes, self.bytes_per_value)

    @property
    def values_per_packet(self) -> int:
        """Values carried by one (full) packet: ``packet_bytes // bytes_per_value``."""
        return self.packet_bytes // self.bytes_per_value


def packet_count(values: int, link: LinkModel) -> int:
    """Packets one message of ``values`` numbers takes: ``⌈values / ⌊packet_bytes / bytes_per_value⌋⌉``.

    A value is never split across packets; when ``bytes_per_value`` divides ``packet_bytes`` (the
    defaults: 1472 / 4 = 368 values) this equals ``⌈values · bytes_per_value / packet_bytes⌉``.

    >>> packet_count(368, LinkModel()), packet_count(369, LinkModel()), packet_count(0, LinkModel())
    (1, 2, 0)
    """
    _check_int("values", values, 0)
    vpp = link.values_per_packet
    return -(-values // vpp)


@dataclass(frozen=True)
class Transfer:
    """One synchronous communication round.

    Parameters
    ----------
    senders, receivers:
        Nodes that send, and nodes that receive, in the round (integers ``>= 1``).
    messages:
        Messages sent in the round, in total (integer ``>= 0``; 0 = an empty round, which costs nothing).
    values_per_message:
        Numbers in each message (integer ``>= 1``), e.g. the model dimension ``d``.
    max_in_messages, max_out_messages:
        The largest number of messages a single node receives / sends in the round. With
        ``messages > 0`` they must be at least ``⌈messages / receivers⌉`` / ``⌈messages / senders⌉``
        (some node receives / sends at least the average) and at most ``messages``; with
        ``messages == 0`` both are 0.

    The constructors :func:`gather`, :func:`broadcast` and :func:`exchange` fill these in for the
    usual rounds.
    """

    senders: int
    receivers: int
    messages: int
    values_per_message: int
    max_in_messages: int
    max_out_messages: int

    def __post_init__(self) -> None:
        _check_int("senders", self.senders, 1)
        _check_int("receivers", self.receivers, 1)
        _check_int("messages", self.messages, 0)
        _check_int("values_per_message", self.values_per_message, 1)
        for name, nodes in (("max_in_messages", self.receivers), ("max_out_messages", self.senders)):
            value = getattr(self, name)
            _check_int(name, value, 0)
            low = -(-self.messages // nodes)
            if not low <= value <= self.messages:
                raise UsageError(name, f"must lie in [{low}, {self.messages}] for {self.messages} messages "
                                       f"over {nodes} nodes, got {value}")

    def bytes(self, link: LinkModel) -> int:
        """Payload bytes sent in the round: ``messages · values_per_message · bytes_per_value``."""
        return self.messages * self.values_per_message * link.bytes_per_value

    def busiest_bytes(self, link: LinkModel) -> int:
        """Bytes through the busiest network card: ``max(max_in, max_out) · values_per_message · bytes_per_value``."""
        return max(self.max_in_messages, self.max_out_messages) * self.values_per_message * link.bytes_per_value


def round_seconds(transfer: Transfer, link: LinkModel) -> float:
    """Seconds one round takes: ``latency + max(m_in, m_out) · v · b / bandwidth`` (0 for an empty round).

    The busiest network card serialises its messages; see the module docstring for the assumptions.

    >>> round_seconds(gather(11, 1, values=1000), LinkModel(latency_s=1e-4, bandwidth_bytes_per_s=1e6))
    0.0441
    """
    if transfer.messages == 0:
        return 0.0
    return link.latency_s + transfer.busiest_bytes(link) / link.bandwidth_bytes_per_s


def gather(workers: int, servers: int, values: int) -> Transfer:
    """Every worker sends one vector of ``values`` numbers to every server.

    ``workers · servers`` messages; a server receives ``workers`` of them, a worker sends ``servers``.
    """
    _check_int("workers", workers, 1)
    _check_int("servers", servers, 1)
    return Transfer(senders=workers, receivers=servers, messages=workers * servers, values_per_message=values,
                    max_in_messages=workers, max_out_messages=servers)


def broadcast(servers: int, workers: int, values: int) -> Transfer:
    """Every server sends one vector of ``values`` numbers (e.g. the model) to every worker.

    ``servers · workers`` messages; a worker receives ``servers`` of them, a server sends ``workers``.
    """
    _check_int("servers", servers, 1)
    _check_int("workers", workers, 1)
    return Transfer(senders=servers, receivers=workers, messages=servers * workers, values_per_message=values,
                    max_in_messages=servers, max_out_messages=workers)


def exchange(servers: int, values: int) -> Transfer:
    """All-to-all among ``servers``: each sends one vector of ``values`` numbers to each other server.

    ``servers · (servers − 1)`` messages, ``servers − 1`` in and out per server (an empty round for one server).
    """
    _check_int("servers", servers, 1)
    return Transfer(senders=servers, receivers=servers, messages=servers * (servers - 1), values_per_message=values,
                    max_in_messages=servers - 1, max_out_messages=servers - 1)


@dataclass(frozen=True)
class StepCost:
    """What one training step costs (:func:`step_cost`).

    Attributes
    ----------
    gradient_computations:
        Mini-batch gradients computed in the step, all workers together.
    messages:
        Messages sent in the step.
    bytes_workers, bytes_servers:
        Payload bytes sent by workers / by servers.
    rounds:
        Non-empty communication rounds.
    step_seconds:
        Compute time of the slowest worker + the rounds' seconds + the caller's ``server_seconds``.
    """

    gradient_computations: int
    messages: int
    bytes_workers: int
    bytes_servers: int
    rounds: int
    step_seconds: float

    def as_row(self) -> dict[str, int | float]:
        """The fields as a row ``{column: value}`` in :data:`COST_COLUMNS` order."""
        return {name: getattr(self, name) for name in COST_COLUMNS}


#: The columns of :meth:`StepCost.as_row`, in order.
COST_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(StepCost))


def step_cost(
    compute_per_worker: int,
    workers: int,
    transfers: Sequence[tuple[str, Transfer]],
    link: LinkModel,
    *,
    server_seconds: float = 0.0,
) -> StepCost:
    """The cost of one synchronous step: gradients, then the rounds ``transfers`` in order.

    .. math::

        t_{\\text{step}} = c \\cdot t_{\\text{grad}} + \\sum_r t_r + t_{\\text{server}}

    Parameters
    ----------
    compute_per_worker:
        Mini-batch gradients each worker computes (``c``, integer ``>= 0``; e.g. ``r`` for a redundancy
        scheme that has each worker compute ``r`` gradients). Workers compute in parallel, so the
        compute time is that of one worker: ``c · link.compute_s``.
    workers:
        Number of workers (integer ``>= 1``): ``gradient_computations = c · workers``.
    transfers:
        ``(sender, round)`` pairs, ``sender`` one of :data:`SENDERS` (``"workers"`` or ``"servers"``),
        which attributes the round's bytes to ``bytes_workers`` or ``bytes_servers``.
    link:
        The network (:class:`LinkModel`).
    server_seconds:
        Seconds added for what the model does not cover (aggregation, decoding; finite, ``>= 0``).
    """
    _check_int("compute_per_worker", compute_per_worker, 0)
    _check_int("workers", workers, 1)
    _check_float("server_seconds", server_seconds, positive=False)
    sent = dict.fromkeys(SENDERS, 0)
    messages = rounds = 0
    seconds = compute_per_worker * link.compute_s
    for sender, transfer in transfers:
        if sender not in sent:
            raise UsageError("sender", f"{sender!r} is unknown; allowed: {', '.join(SENDERS)}")
        if not isinstance(transfer, Transfer):
            raise UsageError("transfers", f"expected Transfer rounds, got {type(transfer).__name__}")
        sent[sender] += transfer.bytes(link)
        messages += transfer.messages
        rounds += transfer.messages > 0
        seconds += round_seconds(transfer, link)
    return StepCost(gradient_computations=compute_per_worker * workers, messages=messages,
                    bytes_workers=sent["workers"], bytes_servers=sent["servers"], rounds=rounds,
                    step_seconds=seconds + server_seconds)

"""Robust *systems* as modes of the simulation (``dpbr train --system/--network/--staleness``).

The rest of :mod:`dpbr.simulation` simulates one trusted, synchronous parameter server. This package
simulates the systems of the Byzantine-robust learning literature with the same data, models,
attacks, privacy mechanisms and rules, and counts what they cost:

:mod:`~dpbr.simulation.systems.run`
    :class:`~dpbr.simulation.systems.run.SystemSimulation` (the loop, the shared steps: gradients at
    given models, privacy, attack, network, aggregation, update) and the one server with lossy links
    and bounded staleness (:class:`~dpbr.simulation.systems.run.SingleServer`).
:mod:`~dpbr.simulation.systems.draco`
    DRACO (Chen et al. 2018, arXiv 1803.09877) on the kernels of :mod:`~dpbr.simulation.systems.codes`
    (fractional repetition code and majority vote; cyclic gradient code, error location, decoding).
:mod:`~dpbr.simulation.systems.servers`
    Replicated servers, some Byzantine: GuanYu (El Mhamdi et al. 2019, arXiv 1905.03853) and LiuBei
    (El Mhamdi, Guerraoui, Guirguis, PODC 2020).
:mod:`~dpbr.simulation.systems.network`
    Lossy UDP links (AggregaThor, Damaskinos et al., SysML 2019): packets lost as NaNs, zeros or whole
    messages.
:mod:`~dpbr.simulation.systems.costs`
    The cost model (no torch): gradient computations, messages, bytes, rounds and a simulated step
    time from latency, bandwidth and compute time per gradient.

The options are parsed and checked by :mod:`dpbr.system_catalog` (no torch: the workflow plans with it).
"""

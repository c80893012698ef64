"""Byzantine robustness: aggregation rules (:mod:`dpbr.robust.aggregators`) and attacks (:mod:`dpbr.robust.attacks`)."""

"""Serving engines Dolphin launches: the embedded sim server (`sim_server`, configured by `sim_spec.SimSpec`)
and the launchers of real engines."""

"""Serving engines Dolphin launches: the embedded sim server (`sim_server`, configured by `sim_spec.SimSpec`)
and the launchers of real engines.

The sim engine's modules, bottom up: `sim_clock` (engine time), `sim_metrics` (vLLM's Prometheus names),
`sim_scheduler` (one continuous-batching instance), `sim_engine` (instances and pd routing), `sim_openai`
(wire format, no I/O), `sim_server` (aiohttp app and process entry point)."""

"""The virtual device: the real serving stack (Deployment, router, policy, telemetry, the worker's
discipline, Scheduler, BlockManager) on virtual time, with the model forward replaced by a step-cost
model: measured on this machine, or a roofline profile of a named accelerator and model shapes.

Not part of the serving path: nothing in engine/, orchestrator/ or server/ imports it
(tests/test_layering.py). See docs/simulate.md.
"""

"""UDM-GRPO: rollout -> advantages -> training states -> objective -> step, and the trainer around them with its
engines, checkpoints, logs and run control.

The modules are imported by name; this file imports nothing."""

__all__ = ["advantages", "batching", "checkpoint", "control", "engine", "evaluation", "logger", "memory",
           "objective", "policy", "preflight", "rollout", "run_folder", "simulate", "states",
           "trainer"]

"""The planner: hardware and model specs in, a plan.yaml out (no engine imports)."""

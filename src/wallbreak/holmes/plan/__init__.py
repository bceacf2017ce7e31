"""Holmes' planner: cluster files, model and training specs, the cost model, placements, plan files."""

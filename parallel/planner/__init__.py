"""Layout planner (cost model, hardware table, layout search) and expert placement. Pure Python + numpy."""

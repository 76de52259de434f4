"""L1: what fits where: sizes from configs (no torch), the --vram planner, placement, offload."""

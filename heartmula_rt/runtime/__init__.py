"""L2: one song runner over the scheduler and engines, the codec beside it, sidecars, edits,
streams, and the Pipeline facade."""

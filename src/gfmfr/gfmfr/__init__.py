"""GFMFR plug-in: grouping, group fusion, teacher preferences and distillation (METHOD.md, steps 4-8)."""

"""GFMFR plug-in: grouping, group fusion, teacher preferences and distillation (docs/method.md, steps 4-8)."""

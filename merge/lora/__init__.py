"""LoRA and other adapters, in one place: reading every on-disk format, the per-module formulas,
placing modules on a base, adapters as delta sources, and the bake/combine/extract/convert
operations.

- `read.py`: PEFT, diffusers, kohya/A1111 and LyCORIS files -> canonical modules (`Adapter`);
- `modules.py`: one module's dense delta (LoRA, Tucker, LoHa, LoKr, full) and DoRA's formula;
- `names.py`: name maps (diffusers <-> LDM/SGM single files, kohya's underscored names);
- `canon.py`: where a module lands on a base (`locate`), and canonical placing (`place`);
- `source.py`: an adapter as a lazy TensorSource of deltas keyed by the base's tensor names;
- `bake.py`, `combine.py`, `extract.py`, `convert.py`, `factor.py`, `write.py`: the operations.

Map of the package: docs/architecture.md.
"""

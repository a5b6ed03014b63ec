"""The oracles of the unification experiment, shipped with it: independent implementations of the published
recurrences (`published_recurrences`, written from the papers, sharing no code with `filters`), the dense
joint Gaussian of the exact family (`joint_gaussian`) and random valid inputs for any design model
(`support`). The tests import them too (``tests/published_recurrences.py`` and its siblings name these
modules)."""

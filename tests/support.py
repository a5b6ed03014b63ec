"""Random valid inputs and the relative error live in `experiments.oracles.support` (the unification
experiment ships them in the wheel); this module keeps their test-side name."""
from experiments.oracles.support import random_inputs, relative_error  # noqa: F401

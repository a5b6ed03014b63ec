"""The independent published recurrences live in `experiments.oracles.published_recurrences` (the unification
experiment ships them in the wheel); this module keeps their test-side name."""
from experiments.oracles.published_recurrences import *  # noqa: F401,F403

"""The dense joint Gaussian oracle lives in `experiments.oracles.joint_gaussian` (the unification experiment
ships it in the wheel); this module keeps its test-side name."""
from experiments.oracles.joint_gaussian import *  # noqa: F401,F403

"""The values each choice flag of the trainer takes.

Torch-free, so that the scripts' `--help` builds its parser without importing torch; `losses.py` and `simulate.py`
take their names from here.
"""

METHODS = ("phased_dmd", "dmd", "sgts")
DMD_WEIGHTINGS = ("normalized", "paper")
FAKE_WEIGHTINGS = ("paper", "inverse_variance", "none")
T_SAMPLINGS = ("shifted", "uniform", "logit_normal")

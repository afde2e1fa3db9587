"""The tasks' names and constants, without torch: settings and the command line name tasks before any model
is loaded (`import kdcache.cli` stays light)."""

CAUSAL_LM = "causal-lm"
TOKEN_CLASSIFICATION = "token-classification"
SEQUENCE_CLASSIFICATION = "sequence-classification"
TASK_NAMES = (CAUSAL_LM, TOKEN_CLASSIFICATION, SEQUENCE_CLASSIFICATION)
FULL_DISTRIBUTION_MAX_LABELS = 256
IGNORE_LABEL = -100

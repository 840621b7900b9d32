"""Record keys and message types shared by the ServerApp and the ClientApp (kebab-case,
as Flower's own strategies keep them)."""

from __future__ import annotations

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CANDIDATE_PREFIX = "candidate-"

VOTE_MESSAGE_TYPE = "query.vote"

# train config (server -> subscriber)
SERVER_ROUND = "server-round"
UPDATE_KIND = "update-kind"  # "delta" (PoI) or "weights" (Flower's built-in strategies)
NOISE_MULTIPLIER = "noise-multiplier"
TARGET_EPSILON = "target-epsilon"
MAX_GRAD_NORM = "max-grad-norm"
TARGET_DELTA = "target-delta"
PLANNED_ROUNDS = "planned-rounds"

# train reply metrics (subscriber -> server)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
SAMPLE_EPSILON = "sample-epsilon"
PARTITION_ID = "partition-id"

# vote config and reply
CANDIDATE_IDS = "candidate-ids"
CANDIDATE_AUTHORS = "candidate-authors"
VOTE_STEP = "vote-step"  # voters score base + vote_step * update
BASE_LOSS = "base-loss"
LOSSES = "losses"
# the marginal vote (vote-rule = marginal)
VOTE_RULE = "vote-rule"  # "marginal" or "single"
TRUSTED_MEAN = "trusted-mean"  # ArrayRecord: the float64 mean of the trusted set's updates
TRUSTED_SIZE = "trusted-size"
TRUSTED_IDS = "trusted-ids"  # the trusted set's candidate ids (the voter derives membership)
AGGREGATE_DIGEST = "aggregate-digest"  # digest of the trusted mean the voter was sent
MARGINALS = "marginals"  # per ballot candidate: loss without it - loss with it

# error codes in error replies (Flower reserves small codes; ours start at 1000)
ERROR_BUDGET = 1001
ERROR_DATA = 1002
ERROR_REQUEST = 1003

# ledger (server -> subscriber, in the train and vote configs)
TASK_ID = "task-id"
BASE_DIGEST = "base-digest"
LEDGER_CHECKPOINT = "ledger-checkpoint"
LEDGER_LOG_KEY = "ledger-log-key"
LEDGER_PROOF = "ledger-proof"
LEDGER_PROOF_FROM = "ledger-proof-from"
# a second proof, from the last tree this subscriber *cosigned* (used when its last
# reply was lost after it had verified a newer tree, or the other way round)
LEDGER_ALT_PROOF = "ledger-alt-proof"
LEDGER_ALT_PROOF_FROM = "ledger-alt-proof-from"
LEDGER_NEXT_SEQ = "ledger-next-seq"  # -1: the log has no key entry from this subscriber yet
# the final checkpoint after the settlement (``query.witness``): the settlement entry,
# its index and inclusion proof in the checkpoint's tree
WITNESS_MESSAGE_TYPE = "query.witness"
LEDGER_SETTLEMENT = "ledger-settlement"
LEDGER_SETTLEMENT_INDEX = "ledger-settlement-index"
LEDGER_SETTLEMENT_PROOF = "ledger-settlement-proof"
LEDGER_SETTLEMENT_BULK = "ledger-settlement-bulk"  # its bulk blob, when it has one

# ledger (subscriber -> server, a ConfigRecord under LEDGER in the reply)
LEDGER = "ledger"
LEDGER_ENTRIES = "entries"
LEDGER_COSIGNED = "cosigned-checkpoint"
LEDGER_WITNESS_KEY = "witness-key"

ERROR_LEDGER = 1004

"""The Flower round: the Proof-of-Intelligence strategy and its pure algorithms (update
validation, vote tally, selection), the operator's per-round ledger writer, the robust
baselines, and the run report."""

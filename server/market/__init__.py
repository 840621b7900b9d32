"""The market around a task (docs/market.md): the Scientist and its terms
(``scientist``), reading and replaying the market from the ledger (``replay``), the pure
settlement of reward, deposit and fees (``settlement``, ``fees``), the task's life in a
run (``session``), ``poi audit`` (``audit``) and the market plot (``plot``)."""

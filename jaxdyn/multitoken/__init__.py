"""Multi-token prediction heads (DynaMo): the extra-heads block, the objective, co-occurrence
tables, the joint grid and multi-token / verify decoding."""

"""Temporal-causal adapters (DYNAMO): Time2Vec and graph encoders, the adapters, batching of
TCG-Synth records, the objective, the syllable tokenizer, the synthetic benchmark, scoring and
conditioned decoding."""

"""
The built-in demo's pieces, shared by the recipe's demo run, the benchmarks and the tests: a tiny model and tokenizer
built offline (`tiny`), the addition task (`addition`), held-out evaluation by greedy decoding (`heldout`), a run's
metrics as JSON lines and a plot (`reporting`), and the peak-memory meter (`memory`). The CHORD trainer never imports
them.
"""

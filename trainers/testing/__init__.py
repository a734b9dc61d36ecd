"""Fixtures built by the pack itself, so that tests, the demo and benchmarks need nothing from outside: random-weight
models of the real architectures, a generated tokenizer, made-up subject photos and random DINO weights."""

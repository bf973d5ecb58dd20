"""Helpers shared by the tests and the benchmarks (one importable place, so neither imports the other):
`ranks` runs a function on N gloo ranks, `jobs` runs the real launcher on the main job, `samples` holds the
hand-built prompt samples, tiny CKF model factory and fake evaluation model. Nothing in the pipeline imports this.
"""

"""Fine-tuning a model on human norms: the spec, the examples, the objectives and the loop.

The trainer service runs these as jobs; nothing here knows about gRPC.
"""

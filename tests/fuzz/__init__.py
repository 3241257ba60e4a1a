"""Hostile-input tests: property-based fuzzing of framing, decoding, the pipeline and the server."""

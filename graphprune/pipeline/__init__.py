"""The prune pipeline: a session carries a model from load to report; modes are thin drivers over it."""

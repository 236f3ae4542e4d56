"""Roles of parameter axes in a channel group.

- ``producer``: the axis creates the channel (Conv weight rows, bias, Gemm output columns);
- ``consumer``: the axis reads the channel (Conv weight input columns, Gemm input rows);
- ``channelwise``: the axis scales or shifts the channel (norm parameters, PRelu slopes,
  per-channel constants in elementwise ops).
"""

PRODUCER = "producer"
CONSUMER = "consumer"
CHANNELWISE = "channelwise"

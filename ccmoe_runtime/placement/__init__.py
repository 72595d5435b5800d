"""Placement: the cost model, host calibration, memory accounting, -ot rules and the search that puts each tensor
in GPU or host memory for the fastest predicted decode."""

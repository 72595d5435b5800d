"""Shared by every stage: errors and exit codes, units, safe output files, versioned JSON artifacts, paths,
and the pinned llama.cpp source tree."""

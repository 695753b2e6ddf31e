"""Scaling-law studies: FLOP accounting, sweeps of runs, fits with uncertainty, figures and reports."""

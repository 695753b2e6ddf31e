"""Evaluations that read a trained run and return numbers: library functions a study calls as steps."""

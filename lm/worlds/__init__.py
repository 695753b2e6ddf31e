"""Generated worlds: data deterministic from a seed, each with the program that scores answers in it.

- `instructions`: short instructions (reverse, sort, count, add, ...) with checkable answers, the
  answer styles of the SFT data and a hidden preference among them, for SFT, reward models and DPO.
"""

"""The bottom layer: what every other part stands on and which knows nothing of them.

config (HMTConfig and the choices it names), segment (the segment rules), memory (MemoryState), ops (the HMT ops'
contract and their torch reference), checks (argument and file checks), atomic (crash-safe files), backbones
(what differs per backbone family).
"""

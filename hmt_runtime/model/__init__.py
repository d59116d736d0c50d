"""The model: HMTModel (the reference forward, checkpoints), load_backbone, and HMT-pytorch conversion.  Stands on
core, native and incremental (``HMTModel.generate`` runs on the scheduler).
"""

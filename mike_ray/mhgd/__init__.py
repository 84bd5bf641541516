"""MHGD — multi-head graph distillation (``shared/papers/mhgd.txt``, DESIGN.md § MHGD).

* :mod:`mike_ray.mhgd.functional`: the math as pure functions (KD-SVD compression, sign fixing and
  alignment, attention logits/graphs, phase-1 and transfer losses, gradient clipping, baseline losses).
* :mod:`mike_ray.mhgd.attention`: :class:`MultiHeadGraph`, the attention heads + estimator of one module.
"""
from mike_ray.mhgd.attention import MultiHeadGraph
from mike_ray.mhgd.functional import (
    align_student,
    attention_graph,
    attention_logits,
    clip_transfer_grads,
    fix_sign,
    phase1_loss,
    student_vectors,
    svd_compress,
    svd_right_vectors,
    teacher_vectors,
    transfer_loss,
)

__all__ = [
    "MultiHeadGraph",
    "align_student",
    "attention_graph",
    "attention_logits",
    "clip_transfer_grads",
    "fix_sign",
    "phase1_loss",
    "student_vectors",
    "svd_compress",
    "svd_right_vectors",
    "teacher_vectors",
    "transfer_loss",
]

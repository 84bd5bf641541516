"""MHGD — multi-head graph distillation (``shared/papers/mhgd.txt``, DESIGN.md § MHGD).

* :mod:`mike_ray.mhgd.functional`: the math as pure functions (KD-SVD compression, sign fixing and
  alignment, attention logits/graphs, phase-1 and transfer losses, gradient clipping, baseline losses).
* :mod:`mike_ray.mhgd.attention`: :class:`MultiHeadGraph`, the attention heads + estimator of one module.
"""
from __future__ import annotations

from mike_ray.utils import lazy_exports

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

# name → submodule, imported on first use (utils.lazy_exports): the configs here stay torch-free
_EXPORTS = {
    "MultiHeadGraph": "attention",
    "align_student": "functional",
    "attention_graph": "functional",
    "attention_logits": "functional",
    "clip_transfer_grads": "functional",
    "fix_sign": "functional",
    "phase1_loss": "functional",
    "student_vectors": "functional",
    "svd_compress": "functional",
    "svd_right_vectors": "functional",
    "teacher_vectors": "functional",
    "transfer_loss": "functional",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

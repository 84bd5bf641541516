"""Models: the paper's teacher segmenter and MIKE autoencoder, a spec-driven registry, and taps.

Every model maps B×3×64×64 float images in [0, 1] to something; teachers are built from a spec dict
with :func:`build_model` and tapped by module path with :class:`TappedModel` (see ``taps``).
"""
from __future__ import annotations

from mike_ray.utils import lazy_exports

__all__ = [
    "AutoEncoder",
    "ModelSpec",
    "Segmenter",
    "TapSpec",
    "TappedModel",
    "available_archs",
    "build_model",
    "check_input_shape",
    "load_weights",
    "paper_autoencoder",
    "paper_segmenter",
    "save_weights",
    "tap_names",
]

# name → submodule, imported on first use (utils.lazy_exports): the configs here stay torch-free
_EXPORTS = {
    "AutoEncoder": "autoencoder",
    "paper_autoencoder": "autoencoder",
    "ModelSpec": "spec",
    "available_archs": "registry",
    "build_model": "registry",
    "load_weights": "registry",
    "save_weights": "registry",
    "Segmenter": "segmenter",
    "paper_segmenter": "segmenter",
    "TappedModel": "taps",
    "TapSpec": "taps",
    "check_input_shape": "taps",
    "tap_names": "taps",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

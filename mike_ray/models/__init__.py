"""Models: the paper's teacher segmenter and MIKE autoencoder, a spec-driven registry, and taps.

Every model maps B×3×64×64 float images in [0, 1] to something; teachers are built from a spec dict
with :func:`build_model` and tapped by module path with :class:`TappedModel` (see ``taps``).
"""
from mike_ray.models.autoencoder import AutoEncoder, paper_autoencoder
from mike_ray.models.registry import ModelSpec, available_archs, build_model, load_weights, save_weights
from mike_ray.models.segmenter import Segmenter, paper_segmenter
from mike_ray.models.taps import TappedModel, TapSpec, check_input_shape, tap_names

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

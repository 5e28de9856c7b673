"""Architectures: importing this package registers every variant."""

from . import cifar_resnets, resnet9, torchvision_models  # noqa: F401  (registration)
from .registry import Classifier, ModelSpec, build_model, list_models, register_model

__all__ = ["Classifier", "ModelSpec", "build_model", "list_models", "register_model"]

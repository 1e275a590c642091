"""Pure PyTorch attention models. No I/O: pixels arrive through ``models.protocol``."""

from models.protocol import AttentionModel, ModelOutput, PixelSource, ReadRequest, drive
from models.registry import create_model, list_models, register_model

__all__ = [
    "AttentionModel",
    "ModelOutput",
    "PixelSource",
    "ReadRequest",
    "create_model",
    "drive",
    "list_models",
    "register_model",
]

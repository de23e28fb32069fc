"""convrecipes: training recipes for image classification.

The public names: trainers, losses, schedules and the LR range test, augmentation, data,
models, checkpoints and recipes. Submodules import torch, timm and kornia; importing this
package imports them too.
"""

from convrecipes.checkpoint import load_checkpoint, save_checkpoint
from convrecipes.errors import CheckpointError, ConvrecipesError, DataError, NonFiniteLossError, RecipeError
from convrecipes.models import Classifier, ModelOutput, create_model
from convrecipes.recipe import Recipe, load_recipe
from convrecipes.trainers import DistillationTrainer, SupervisedTrainer, Trainer

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Trainer", "SupervisedTrainer", "DistillationTrainer",
    "Classifier", "ModelOutput", "create_model",
    "Recipe", "load_recipe",
    "save_checkpoint", "load_checkpoint",
    "ConvrecipesError", "RecipeError", "DataError", "CheckpointError", "NonFiniteLossError",
]

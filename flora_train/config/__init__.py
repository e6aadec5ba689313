"""Recipe schema (OmegaConf structured dataclasses), loading with overrides, and validation."""

from flora_train.config.load import RecipeError, flatten, load_recipe, recipe_to_yaml
from flora_train.config.schema import Recipe

__all__ = ["Recipe", "RecipeError", "flatten", "load_recipe", "recipe_to_yaml"]

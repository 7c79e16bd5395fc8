"""The recipe registry lives with the zoo's metadata in :mod:`butler_zoo.recipes`; this re-exports it."""

from butler_zoo.recipes import Recipe, UnknownRecipeError, all_recipes, get_recipe, recipe_names, register_recipe

__all__ = ["Recipe", "UnknownRecipeError", "register_recipe", "get_recipe", "all_recipes", "recipe_names"]

"""The errors a recipe reports as one line: each says what is wrong and what to do, without a stack of library
internals (`exit_on_recipe_error` prints them)."""


class RecipeError(ValueError):
    """Base class of the errors a recipe reports to the user as a one-line message."""


class UnknownPresetError(RecipeError):
    """The `--dataset` short name is not one of `PRESETS`."""


class MissingColumnError(RecipeError):
    """The image or label column named on the command line is not in the dataset."""


class LabelColumnError(RecipeError):
    """The label column is not a `datasets.ClassLabel` (or the image column is not an image)."""


class MissingSplitError(RecipeError):
    """A split the recipe needs is not in the dataset."""


class DatasetUnavailableError(RecipeError):
    """The dataset cannot be reached: offline, gated, private, misspelt, or script-based."""

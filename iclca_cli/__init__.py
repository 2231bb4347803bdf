"""iclca: turn a demonstration prompt into a weight patch (ICLCA, Chen et al., ICML 2024).

Importing the package registers the `iclca_linear` model family with the transformers Auto classes.
"""

__version__ = "0.1.0"

from .models import register_auto_classes

register_auto_classes()

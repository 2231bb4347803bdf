"""iclca: turn a demonstration prompt into a weight patch (ICLCA, Chen et al., ICML 2024).

Importing the package is cheap (no torch, no transformers), so `iclca --help` answers at once. The model classes
iclca registers with the transformers Auto classes are registered where iclca loads a model, and on
`import iclca_cli.models` for people who use the Auto classes directly.
"""

__version__ = "0.1.0"

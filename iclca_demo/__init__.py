"""What the built-in demo models are trained and measured on, for scripts and tests only (not installed with iclca):
the associative-recall task (tasks.py, configs/tasks/recall.json) and the word-level tokenizer the demos use
(word_tokenizer.py). The scripts find it through scripts/common.py, which puts the repository on sys.path; the tests
through pytest's `pythonpath`."""

"""Tensor math, with no knowledge of models or families: linear attention (naive reference, parallel, chunked, step),
softmax attention with a folded-in prompt (and its reference), Taylor features, the compressed summary."""

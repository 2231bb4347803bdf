"""The dtypes a model runs in and a patch stores, by name (torch's names): here without torch, so the command line's
--help lists them at once; patch.DTYPES maps them to torch dtypes."""

DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")

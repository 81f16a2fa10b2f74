"""Names of the layouts and contenders, importable without torch (the parent process never imports it)."""

LAYOUTS = ("row", "col", "2d")
BOUND = "raw bound"
OURS_SAVE, OURS_DCP_SAVE = "hf_storage.save", "hf_storage DCP writer"
OURS_LOAD, OURS_DCP_LOAD = "hf_storage.load", "hf_storage DCP reader"
TORCH_SAVE, TORCH_LOAD = "torch HF writer+consolidate", "torch HF reader"
SAVE = (BOUND, OURS_SAVE, OURS_DCP_SAVE, TORCH_SAVE, "torch FileSystemWriter", "gather + save_file")
DURABLE_SAVE = SAVE[:5]
SLOW = (TORCH_SAVE, "gather + save_file")  # run --slow-reps times in the main section (5-20x slower)
BULK = "bulk pread + copy (ref)"
LOAD = (BOUND, OURS_LOAD, OURS_DCP_LOAD, TORCH_LOAD, "load_file + slice", BULK)
NEEDS_WHERE = (BOUND, BULK)  # these read at offsets taken from the headers before the clock starts
MANY_SAVE = (OURS_SAVE, OURS_DCP_SAVE, TORCH_SAVE)
MANY_LOAD = (OURS_LOAD, OURS_DCP_LOAD, TORCH_LOAD)

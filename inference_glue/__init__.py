"""inference_glue: see README.md."""

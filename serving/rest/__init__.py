"""REST adapters over the one data plane: `predict` (`/predict*`) and `v2` (the Open Inference
Protocol), with their shared HTTP helpers in `http`. Each adapter registers its routes on the app's
router once; `serving.app` assembles them."""

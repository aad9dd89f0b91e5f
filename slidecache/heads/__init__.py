"""Fitted slide-level heads as arrays in, arrays out: the attention-MIL networks (networks: ABMIL, TransMIL,
CLAM-SB, DSMIL, with mil's shared contract and fitted model), saved heads (safetensors + a JSON card) and
attention heatmaps. `evaluate` fits and saves them; `train.generate --slide` applies them to a new slide. Slides
come in as anything with a SlideView's reading methods (store.slide_view.SlideView)."""

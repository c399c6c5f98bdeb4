"""What a run writes and reads back: the run folder, checkpoints, the model, its ONNX export,
the plot, progress and the early-stopping record. No ray."""

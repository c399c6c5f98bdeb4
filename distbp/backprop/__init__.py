"""The delta equations on one flat parameter buffer: networks, activations, losses, optimizers,
schedules and gradient checks. numpy and the standard library only."""

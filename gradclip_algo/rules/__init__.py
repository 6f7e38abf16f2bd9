"""One module per clipping rule; each takes the parameters whose grads are set and returns ClipStats."""

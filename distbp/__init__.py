"""distbp: data-parallel backpropagation for fully connected networks on Ray."""

__version__ = "0.1.0"

"""Argument checks that the chapter's saved helpers call.

A helper of the chapter states in one sentence what it accepts and calls the
check here, so that the cell a reader reads shows the idea and the library
still refuses a wrong argument with a message that names it. Each check
raises ValueError or TypeError and returns nothing.
"""


# Datasets and pre-processing.


# Face-ResNet, margin losses and the parallel margin layer.


# Training, verification and deployment.

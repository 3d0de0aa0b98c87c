"""Analysis that reads the training code without training: memory and communication predictions, layout
suggestions, pipeline timelines."""

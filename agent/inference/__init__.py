"""Running a model.

Runtime plugins, frame sources, classification, the golden smoke vector and golden-set scoring.
"""

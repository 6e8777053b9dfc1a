"""``qualiteacher app``: a local web page to try a trained model's quality level and fidelity dials.

- ``model.py``   load a model from a stage-3 checkpoint or the MLflow registry (``AppModel``)
- ``logic.py``   read an upload, restore, score, level sweep: plain functions, no browser needed
- ``ui.py``      the Gradio page wired to those functions
- ``command.py`` the sub-command's arguments and start-up
"""
